"""A real MLLP receiver for the tests: python-hl7's asyncio MLLP server
(``hl7.mllp.start_hl7_server``) in its own process.

It appends every message it gets to ``--log`` (one JSON line: control ID,
raw text) and answers by the control ID's prefix, so a test says per
message what the receiver does: ``AE-`` -> AE, ``AR-`` -> AR, ``SILENT-`` ->
no answer (an ACK timeout), ``AEONCE-`` -> AE the first time, AA after;
anything else AA.  Prints ``READY <port>`` once it listens.  Without
``--log`` it only answers (bench/mllp uses it so as the peer).

python-hl7 gives each ACK a random control ID (MSH-10: a timestamp and four
random letters or digits); ``--seed`` makes that sequence repeatable, so a
test can reproduce an ACK whose MSH-10 happens to look like something else.
"""

import argparse
import asyncio
import json
import random

from hl7.mllp import start_hl7_server

seen: dict = {}


async def serve(log_path, port=0):
    async def client(reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                control_id = str(message.segment("MSH")(10))
                if log_path:
                    with open(log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"control_id": control_id, "text": str(message)}) + "\n")
                seen[control_id] = seen.get(control_id, 0) + 1
                if control_id.startswith("SILENT-"):
                    continue
                code = "AA"
                if control_id.startswith("AE-"):
                    code = "AE"
                elif control_id.startswith("AR-"):
                    code = "AR"
                elif control_id.startswith("AEONCE-") and seen[control_id] == 1:
                    code = "AE"
                writer.writemessage(message.create_ack(code))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # python-hl7 decodes as ASCII unless told (it does not read MSH-18)
    server = await start_hl7_server(client, "127.0.0.1", port, encoding="utf-8")
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.seed is not None:
        random.seed(args.seed)
    asyncio.run(serve(args.log, args.port))
