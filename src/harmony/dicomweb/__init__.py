"""DICOMweb (PS3.18) building blocks shared by the ``dicomweb`` endpoint, the
``dicomweb`` backend and the ``dicomweb_bridge`` middleware: request parsing
(routes, QIDO parameters, Accept negotiation), the parsed-request form that
travels in envelopes, DICOM JSON rendering and multipart bodies."""
