"""harmony.dicomweb.pixels: frames cut out as stored or decoded, renderings, bulk data, from
synthetic pydicom files (tests/dicom_data.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from harmony.dicomweb.accept import PNG
from harmony.dicomweb.pixels import bulk_value, extract_frames, number_of_frames, render
from harmony.errors import NotAcceptable, NotFound
from tests.dicom_data import make_instance, save


@pytest.fixture
def multiframe(tmp_path):
    return save(make_instance(frames=3, rows=8, cols=8, seed=1), tmp_path / "mf.dcm")


@pytest.fixture
def rle(tmp_path):
    return save(make_instance(rows=8, cols=8, transfer_syntax=RLELossless, seed=2), tmp_path / "rle.dcm")


def test_native_frames_are_sliced_without_decoding(multiframe):
    pixels = dcmread(multiframe).pixel_array
    frames, syntax = extract_frames(multiframe, [3, 1], None)
    assert syntax == ExplicitVRLittleEndian
    assert frames == [pixels[2].tobytes(), pixels[0].tobytes()]


def test_encapsulated_frames_as_stored_or_decoded(rle):
    stored, syntax = extract_frames(rle, [1], "*")
    assert syntax == RLELossless and stored[0] != dcmread(rle).pixel_array.tobytes()
    decoded, syntax = extract_frames(rle, [1], None)
    assert syntax == ExplicitVRLittleEndian and decoded[0] == dcmread(rle).pixel_array.astype("<u2").tobytes()
    with pytest.raises(NotAcceptable):
        extract_frames(rle, [1], "1.2.840.10008.1.2.4.50")


def test_a_frame_that_does_not_exist_is_404(multiframe):
    with pytest.raises(NotFound, match="frame 4"):
        extract_frames(multiframe, [4], None)
    assert number_of_frames(dcmread(multiframe)) == 3


def test_renderings_are_8_bit_images_of_the_frame(multiframe):
    image = Image.open(io.BytesIO(render(multiframe, 2, PNG)))
    assert image.format == "PNG" and image.mode == "L" and image.size == (8, 8)
    values = np.asarray(image)
    assert values.min() == 0 and values.max() == 255  # windowed to the frame's range
    thumbnail = Image.open(io.BytesIO(render(multiframe, 1, thumbnail=True)))
    assert thumbnail.format == "JPEG"


def test_bulk_values_by_path(multiframe):
    assert bulk_value(multiframe, ("7FE00010",)) == dcmread(multiframe).PixelData
    with pytest.raises(NotFound):
        bulk_value(multiframe, ("00540016", "0", "00181072"))
    with pytest.raises(NotFound, match="not bulk data"):
        bulk_value(multiframe, ("00100020",))
