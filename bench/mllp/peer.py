"""The benchmark's MLLP receiver: python-hl7's asyncio MLLP server answering
every message with python-hl7's own AA (``Message.create_ack``), nothing else.
Prints ``READY`` once it listens on the port given."""

import asyncio
import sys

from hl7.mllp import start_hl7_server


async def main(port: int):
    async def client(reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await start_hl7_server(client, "127.0.0.1", port, encoding="utf-8")
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
