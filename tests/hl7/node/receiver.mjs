// node-hl7-server as an MLLP receiver for Harmony's tests: appends every message
// it gets to LOG (a JSON line: control ID, text) and answers AA (AR when the
// control ID starts "AR-"). Prints "READY <port>" once it listens.
//   node receiver.mjs PORT LOG
import fs from 'node:fs'
import net from 'node:net'
import { Server } from 'node-hl7-server'

const [port, log] = [Number(process.argv[2]), process.argv[3]]
const server = new Server({ bindAddress: '127.0.0.1' })
const inbound = server.createInbound({ port }, async (req, res) => {
  const message = req.getMessage()
  const controlId = message.get('MSH.10').toString()
  fs.appendFileSync(log, JSON.stringify({ control_id: controlId, text: message.toString() }) + '\n')
  await res.sendResponse(controlId.startsWith('AR-') ? 'AR' : 'AA')
})
// node-hl7-server has no "listening" event of its own: poll the port.
const probe = () => {
  const s = net.connect(port, '127.0.0.1', () => { s.destroy(); console.log(`READY ${port}`) })
  s.on('error', () => setTimeout(probe, 20))
}
probe()
process.on('SIGTERM', async () => { await inbound.close(); process.exit(0) })
