// node-hl7-client as an MLLP sender for Harmony's tests: sends the messages of
// FILE (a JSON list of ER7 strings) one after the other, each once its
// predecessor is acknowledged, and prints each ACK as a JSON line
// {control_id, code}. Exits 0 once every message got an ACK.
//   node sender.mjs PORT FILE
import fs from 'node:fs'
import { Client, Message } from 'node-hl7-client'

const [port, file] = [Number(process.argv[2]), process.argv[3]]
const texts = JSON.parse(fs.readFileSync(file, 'utf8'))
const client = new Client({ host: '127.0.0.1' })
let next = 0
let connection
const sendNext = async () => {
  if (next >= texts.length) {
    await connection.close()
    process.exit(0)
  }
  await connection.sendMessage(new Message({ text: texts[next++] }))
}
connection = client.createConnection({ port, waitAck: true }, async (res) => {
  const ack = res.getMessage()
  console.log(JSON.stringify({ control_id: ack.get('MSA.2').toString(), code: ack.get('MSA.1').toString(),
                               text: ack.toString() }))
  await sendNext()
})
connection.on('connect', () => { sendNext() })
setTimeout(() => { console.error('timed out'); process.exit(2) }, 30000).unref()
