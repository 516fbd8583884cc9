"""Image validation, decoding and resizing with OpenCV: the single decode path of the project.

    from pipeline import image_decode
    result = image_decode.decode_and_resize(data, size=300, resize="stretch")

Used by the ingest job (stage 1) and by `headstart predict`, so new images are prepared exactly
like training images. Pure functions, no Beam.

Policy (documented in README "Image policy"):
- The header is read first (a plain JPEG's marker segments directly, anything else with
  Pillow's lazy open, which parses only the header): images above `max_pixels` are refused
  before any pixel buffer is allocated (decompression bombs).
- Output is always 8-bit, 3-channel RGB. Grayscale and palette images are expanded; CMYK is
  converted; 16-bit images are scaled to 8 bits; alpha is composited on `background`
  (white by default); animated images keep their first frame.
- EXIF orientation is applied (the image is stored upright, as a viewer shows it).
- Shrinking uses INTER_AREA, after a reduced-size JPEG decode (IMREAD_REDUCED_COLOR_2/4/8) when
  the image is at least twice the needed size: the DCT-domain downscale is far cheaper than a
  full decode followed by a big INTER_AREA. Enlarging uses INTER_CUBIC.
- A JPEG without its end-of-image marker is `truncated` (libjpeg only warns and returns a
  half-grey image).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import time

import cv2
import numpy as np
from PIL import Image, ImageOps

from contracts.layout import RESIZE_MODES

FORMATS = ("jpeg", "png")
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 32
JPEG_QUALITY = 95
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION_TAG = 0x0112
# The key of a prepared record that holds its CPU seconds by phase (not stored in the dataset).
PHASES_KEY = "phase_cpu_seconds"
# How far before the end a JPEG's end-of-image marker may sit (some encoders pad with zeros).
_JPEG_TRAILER_SLACK_BYTES = 64

# JPEG markers without a length (TEM, RST0-7; SOI never stands after the start), and the
# start-of-frame markers a plain JPEG may use (baseline, extended, progressive; Huffman coded).
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_PLAIN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})

# The reduced decode flags and their scale, largest reduction first.
_REDUCED_DECODES = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2))


class ImageError(ValueError):
  """An input is not a usable image; `reason` is the dead-letter reason code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):
    # Crosses the process boundary of the isolated decoder: rebuild with both arguments.
    return type(self), (self.reason, str(self))


@dataclasses.dataclass(frozen=True)
class Header:
  """What the file header says, read without decoding pixels."""
  format: str
  width: int
  height: int
  mode: str
  frames: int
  orientation: int


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Maps source pixel coordinates to stored-image pixel coordinates: `x' = x * scale + offset`."""
  scale_x: float
  scale_y: float
  offset_x: float
  offset_y: float
  size: int

  def normalise(self, points: np.ndarray) -> np.ndarray:
    """Source-pixel (K, 2) points -> [0, 1] coordinates of the stored image."""
    out = np.empty_like(points, dtype=np.float32)
    out[:, 0] = (points[:, 0] * self.scale_x + self.offset_x) / self.size
    out[:, 1] = (points[:, 1] * self.scale_y + self.offset_y) / self.size
    return out

  def to_source_pixels(self, normalised: np.ndarray) -> np.ndarray:
    """Inverse of `normalise`: [0, 1] stored-image points -> source pixels."""
    out = np.empty_like(normalised, dtype=np.float32)
    out[..., 0] = (normalised[..., 0] * self.size - self.offset_x) / self.scale_x
    out[..., 1] = (normalised[..., 1] * self.size - self.offset_y) / self.scale_y
    return out


@dataclasses.dataclass(frozen=True)
class DecodedImage:
  """An RGB uint8 image of `size`×`size` plus where it came from."""
  rgb: np.ndarray
  source_width: int
  source_height: int
  geometry: Geometry


def sniff_format(data: bytes) -> str | None:
  """Names the image format from magic bytes (`jpeg`, `png`, `gif`, `webp`, `bmp`, `tiff`)."""
  if data.startswith(_JPEG_MAGIC):
    return "jpeg"
  if data.startswith(_PNG_MAGIC):
    return "png"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "gif"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  if data[:2] == b"BM":
    return "bmp"
  if data[:4] in (b"II*\x00", b"MM\x00*"):
    return "tiff"
  return None


def _plain_jpeg_header(data: bytes) -> Header | None:
  """The header of a plain JPEG, read from its marker segments up to the start of scan; None
  for anything else, which Pillow reads (`read_header`).

  Plain: 8-bit Huffman-coded frame (baseline, extended or progressive) of 1 or 3 components, no
  APP1 segment (Exif or XMP: either may carry an orientation) and no multi-picture (MPF)
  segment, every segment well formed. That is what Pillow would say of such a file (mode L or
  RGB, one frame, orientation 1) without its per-segment Python parsing: `prepare_record` of
  an 11 KB 200 px JPEG took 0.546 ms with Pillow's header, 0.511 with this one (issue 17).
  """
  position, end, frame = 2, len(data), None
  while position + 4 <= end:
    if data[position] != 0xFF:
      return None
    marker = data[position + 1]
    if marker in _STANDALONE_MARKERS:
      position += 2
      continue
    if marker < 0xC0 or marker == 0xFF:  # fill bytes, stray data: Pillow's leniency decides
      return None
    length = int.from_bytes(data[position + 2:position + 4], "big")
    body = position + 4
    if length < 2 or position + 2 + length > end:
      return None
    if marker == 0xDA:  # start of scan: the header is complete
      return frame
    if marker == 0xE1 or (marker == 0xE2 and data[body:body + 4] == b"MPF\0"):
      return None
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
      components = data[body + 5] if length >= 8 else 0
      if (marker not in _PLAIN_FRAMES or frame is not None or data[body] != 8
          or components not in (1, 3)):
        return None
      height = int.from_bytes(data[body + 1:body + 3], "big")
      width = int.from_bytes(data[body + 3:body + 5], "big")
      if not (width and height):
        return None
      frame = Header("jpeg", width, height, "L" if components == 1 else "RGB", 1, 1)
    position += 2 + length
  return None


def read_header(data: bytes) -> Header:
  """Parses the header only.

  Raises:
    ImageError: empty input, not an image, or a header Pillow cannot parse.
  """
  if not data:
    raise ImageError("empty_file", "the file is empty (0 bytes)")
  kind = sniff_format(data)
  if kind is None:
    head = data[:64].lstrip().lower()
    what = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not an image"
    raise ImageError("not_an_image", f"content is {what} (magic bytes {data[:8]!r})")
  if kind == "jpeg" and (header := _plain_jpeg_header(data)) is not None:
    return header
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      frames = int(getattr(image, "n_frames", 1))
      orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1)) if kind == "jpeg" else 1
      return Header(kind, width, height, image.mode, frames, orientation)
  except Image.DecompressionBombError as error:
    raise ImageError("too_many_pixels", str(error)) from error
  except (OSError, SyntaxError, ValueError) as error:
    if kind in ("jpeg", "png") and not _has_end_marker(data, kind):
      raise ImageError("truncated", f"{kind} file ends before its header does: truncated") from error
    raise ImageError("corrupt_header", f"unreadable {kind} header: {error}") from error


def _has_end_marker(data: bytes, kind: str) -> bool:
  if kind == "jpeg":
    return data[-_JPEG_TRAILER_SLACK_BYTES:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
  if kind == "png":
    return b"IEND" in data[-32:]
  return True


def _check_complete(data: bytes, header: Header) -> None:
  if not _has_end_marker(data, header.format):
    marker = "end-of-image marker" if header.format == "jpeg" else "IEND chunk"
    raise ImageError("truncated", f"{header.format} has no {marker}: the file is truncated")


def reduced_decode_flag(header: Header, needed: int, resize: str) -> int:
  """The largest DCT reduction that keeps the decoded image at least `needed` on the side that
  matters (IMREAD_COLOR when none does)."""
  if header.format != "jpeg" or header.mode not in ("RGB", "L", "YCbCr"):
    return cv2.IMREAD_COLOR
  # "pad" fits the long side, "crop" fills with the short side, "stretch" needs both.
  side = {"pad": max, "crop": min, "stretch": min}[resize](header.width, header.height)
  for factor, flag in _REDUCED_DECODES:
    if side // factor >= needed:
      return flag
  return cv2.IMREAD_COLOR


def _to_bgr8(array: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
  """OpenCV output (gray, BGR, BGRA; 8 or 16 bit) -> BGR uint8, alpha composited on the RGB
  `background`."""
  if array.dtype == np.uint16:
    array = (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
  elif array.dtype != np.uint8:
    array = cv2.normalize(array, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
  if array.ndim == 2:
    return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
  if array.shape[2] == 4:
    alpha = array[:, :, 3:4].astype(np.float32) / 255.0
    bgr = array[:, :, :3].astype(np.float32)
    back = np.array(background[::-1], np.float32)
    return (bgr * alpha + back * (1.0 - alpha) + 0.5).astype(np.uint8)
  return array


def _decode_with_pillow(data: bytes, background: tuple[int, int, int]) -> np.ndarray:
  """Fallback for what OpenCV cannot read (GIF/animated, odd modes): first frame, upright, BGR."""
  with Image.open(io.BytesIO(data)) as image:
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
      canvas = Image.new("RGB", image.size, background)
      canvas.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
      image = canvas
    elif image.mode == "I;16" or image.mode == "I":
      return _to_bgr8(np.asarray(image).astype(np.uint16), background)
    return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
  transforms = {
      2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
      5: lambda a: np.transpose(a, (1, 0, 2)), 6: lambda a: np.rot90(a, -1),
      7: lambda a: np.rot90(a, 1)[::-1], 8: lambda a: np.rot90(a, 1),
  }
  return np.ascontiguousarray(transforms[orientation](rgb)) if orientation in transforms else rgb


def _decode_bgr(data: bytes, needed: int, resize: str, max_pixels: int, min_side: int,
                background: tuple[int, int, int]) -> tuple[np.ndarray, Header]:
  """Validates and decodes to upright BGR uint8 (OpenCV's order: ingest encodes it as it is,
  without two colour swaps per image); see `decode_rgb`."""
  header = read_header(data)
  if header.width * header.height > max_pixels:
    raise ImageError("too_many_pixels", f"{header.width}x{header.height} = "
                     f"{header.width * header.height} pixels exceeds the limit of {max_pixels}")
  if min(header.width, header.height) < min_side:
    raise ImageError("too_small", f"{header.width}x{header.height} is below the minimum side of "
                     f"{min_side} px")
  _check_complete(data, header)
  buffer = np.frombuffer(data, np.uint8)
  needs_unchanged = header.mode in ("RGBA", "LA", "PA", "I;16", "I;16B", "I", "P") or (
      header.format == "png" and header.mode not in ("RGB", "L"))
  if header.format in ("gif", "webp", "tiff") or header.frames > 1:
    bgr = _decode_with_pillow(data, background)
  elif needs_unchanged:
    array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    bgr = None if array is None else _apply_orientation(_to_bgr8(array, background),
                                                        header.orientation)
  else:
    # IMREAD_COLOR (and the reduced variants) apply EXIF orientation themselves.
    bgr = cv2.imdecode(buffer, reduced_decode_flag(header, needed, resize))
  if bgr is None:
    raise ImageError("decode_failed", f"OpenCV could not decode this {header.format} image")
  return bgr, header


def decode_rgb(data: bytes, *, needed: int = 0, resize: str = "stretch",
               max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
               background: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, Header]:
  """Validates and decodes to upright RGB uint8, reduced when only `needed` pixels are needed.

  Returns:
    The RGB array (possibly reduced by 2, 4 or 8) and the header (original size).

  Raises:
    ImageError: with a dead-letter reason code.
  """
  bgr, header = _decode_bgr(data, needed, resize, max_pixels, min_side, background)
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), header


def _upright_size(header: Header) -> tuple[int, int]:
  """(width, height) as displayed, after EXIF orientation."""
  if header.orientation in (5, 6, 7, 8):
    return header.height, header.width
  return header.width, header.height


def resize_geometry(width: int, height: int, size: int, resize: str) -> Geometry:
  """The source->stored mapping for a resize mode (independent of any reduced decode)."""
  if resize == "stretch":
    return Geometry(size / width, size / height, 0.0, 0.0, size)
  if resize == "pad":
    scale = size / max(width, height)
    return Geometry(scale, scale, (size - width * scale) / 2, (size - height * scale) / 2, size)
  if resize == "crop":
    scale = size / min(width, height)
    return Geometry(scale, scale, (size - width * scale) / 2, (size - height * scale) / 2, size)
  raise ValueError(f"unknown resize mode {resize!r}; allowed: {', '.join(RESIZE_MODES)}")


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
  shrinking = width * height < rgb.shape[0] * rgb.shape[1]
  return cv2.resize(rgb, (width, height),
                    interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def fit(rgb: np.ndarray, size: int, resize: str,
        background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """Resizes an image to `size`×`size` by stretching, letterboxing (pad) or centre-cropping;
  `background` (the padding) is in the image's channel order."""
  height, width = rgb.shape[:2]
  if resize == "stretch":
    return _resize(rgb, size, size)
  geometry = resize_geometry(width, height, size, resize)
  new_width = max(1, round(width * geometry.scale_x))
  new_height = max(1, round(height * geometry.scale_y))
  scaled = _resize(rgb, new_width, new_height)
  if resize == "pad":
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = background
    top, left = (size - new_height) // 2, (size - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = scaled
    return canvas
  top, left = (new_height - size) // 2, (new_width - size) // 2
  return np.ascontiguousarray(scaled[top:top + size, left:left + size])


def decode_and_resize(data: bytes, *, size: int, resize: str = "stretch",
                      max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
                      background: tuple[int, int, int] = (255, 255, 255)) -> DecodedImage:
  """Bytes of any supported image -> `size`×`size` RGB uint8 plus the source geometry.

  Raises:
    ImageError: the bytes are not a usable image (reason code in `.reason`).
    ValueError: `resize` is not one of RESIZE_MODES.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {resize!r}; allowed: {', '.join(RESIZE_MODES)}")
  rgb, header = decode_rgb(data, needed=size, resize=resize, max_pixels=max_pixels,
                           min_side=min_side, background=background)
  width, height = _upright_size(header)
  return DecodedImage(fit(rgb, size, resize, background), width, height,
                      resize_geometry(width, height, size, resize))


def encode(rgb: np.ndarray, image_format: str) -> bytes:
  """RGB uint8 -> JPEG (quality 95) or PNG bytes."""
  return _encode_bgr(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), image_format)


def _encode_bgr(bgr: np.ndarray, image_format: str) -> bytes:
  if image_format == "jpeg":
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  elif image_format == "png":
    ok, buffer = cv2.imencode(".png", bgr)
  else:
    raise ValueError(f"unknown image format {image_format!r}; allowed: {', '.join(FORMATS)}")
  if not ok:
    raise ImageError("encode_failed", f"OpenCV could not encode a {bgr.shape} image")
  return buffer.tobytes()


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How ingest prepares every image (picklable; importing this module pulls in no TensorFlow,
  so an isolated decoder subprocess starts fast)."""
  size: int = 300
  resize: str = "stretch"
  image_format: str = "jpeg"
  max_pixels: int = DEFAULT_MAX_PIXELS
  min_side: int = DEFAULT_MIN_SIDE
  background: tuple[int, int, int] = (255, 255, 255)


def prepare_record(row: dict, data: bytes, settings: DecodeSettings) -> dict:
  """Fetched bytes + source row -> the row plus `image` (encoded), source size, content sha256
  (`row["content_sha256"]` when the caller has hashed `data` already) and, for keypoint rows,
  `targets` normalised to the stored image.

  Also `PHASES_KEY`: this call's CPU seconds by phase (decode: header, decode and resize;
  encode; hash), which ingest adds to its counters and leaves out of the record.

  Raises:
    ImageError: the bytes are not a usable image.
  """
  if settings.resize not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {settings.resize!r}; allowed: "
                     f"{', '.join(RESIZE_MODES)}")
  started = time.thread_time()
  bgr, header = _decode_bgr(data, settings.size, settings.resize, settings.max_pixels,
                            settings.min_side, settings.background)
  width, height = _upright_size(header)
  fitted = fit(bgr, settings.size, settings.resize, settings.background[::-1])
  decoded = time.thread_time()
  image = _encode_bgr(fitted, settings.image_format)
  encoded = time.thread_time()
  # A caller that hashed these bytes already (the download cache does) passes the digest in.
  digest = row.get("content_sha256") or hashlib.sha256(data).hexdigest()
  hashed = time.thread_time()
  result = dict(row)
  result.update(image=image, width=width, height=height, content_sha256=digest)
  result[PHASES_KEY] = {"decode": decoded - started, "encode": encoded - decoded,
                        "hash": hashed - encoded}
  if row.get("targets") is not None:
    points = np.asarray(row["targets"], np.float32).reshape(-1, 2)
    result["targets"] = resize_geometry(width, height, settings.size,
                                        settings.resize).normalise(points).tolist()
  return result
