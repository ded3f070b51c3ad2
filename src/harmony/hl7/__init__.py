"""HL7 v2 toolkit: what the ``mllp`` endpoint and backend, the durable relay
and the v2 <-> JSON mapping share, without any of the proxy around them.

- :mod:`.framing`: MLLP frames (0x0B ... 0x1C 0x0D) with a bounded decoder;
- :mod:`.message`: bytes -> :class:`~.message.V2Message` (MSH-18 character
  sets, separators from MSH-1/MSH-2, the header fields a router needs);
- :mod:`.escaping`: the v2 escape sequences, both ways, without loss;
- :mod:`.jsonview`: the normalised JSON view middleware (JOLT) works on, and
  back from it to ER7;
- :mod:`.ack`: ACK messages (original and enhanced mode, ERR segments) and
  reading a peer's ACK.

Parsing into segments/fields/repetitions/components is python-hl7's
(``hl7`` on PyPI); docs/hl7.md says why that library.
"""
