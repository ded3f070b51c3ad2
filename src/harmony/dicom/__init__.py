"""DICOM plumbing shared by the DIMSE, DICOMweb, JMIX and archive code."""
