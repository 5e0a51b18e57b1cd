"""What a request to ``cnnkit serve`` uploads: images and short videos, checked before they are decoded
(bytes, pixels, frames) and refused with a :class:`BadRequest` naming the file and the problem."""

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cnnkit.data.images import VIDEO_EXTENSIONS, Frame, to_image_tensor


@dataclass(frozen=True)
class Limits:
    """What one request may send: bytes per image, pixels per image (or video frame), images per request,
    bytes per video and frames taken from one video (after sampling at the requested ``fps``)."""

    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_images: int = 64
    max_video_bytes: int = 200_000_000
    max_frames: int = 600


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode(data: bytes, name: str, limits: Limits) -> Frame:
    """One uploaded image, checked before its pixels are decoded (size, pixel count) and while they are."""
    if len(data) > limits.max_bytes:
        raise BadRequest(413, f"{name}: {len(data):,} bytes, over the limit of {limits.max_bytes:,}")
    if not data:
        raise BadRequest(400, f"{name}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > limits.max_pixels:
                raise BadRequest(413, f"{name}: {w}x{h} pixels, over the limit of {limits.max_pixels:,}")
            image.load()
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(400, f"{name}: not an image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(413, f"{name}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise BadRequest(400, f"{name}: a truncated or corrupt image ({exc})") from None
    return Frame(Path(name), to_image_tensor(image, name))


@dataclass
class Video:
    """An uploaded video, opened (its first frame's size checked) and decoded lazily: :meth:`frames`
    yields the frames sampled at ``fps`` (None: every frame), each with its time in seconds, and stops
    with a 413 past ``max_frames``. A video cut short keeps the frames before the damage (``note`` says
    where it ended)."""

    name: str
    container: Any
    fps: float | None
    limits: Limits
    width: int = 0
    height: int = 0
    rate: float = 0.0  # the video's own frames per second
    duration: float | None = None
    note: str | None = None
    taken: int = 0
    times: list[float] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "width": self.width, "height": self.height, "fps": round(self.rate, 3),
                "duration": self.duration, "sampled_fps": self.fps, "note": self.note}  # fmt: skip

    def frames(self) -> Iterator[Frame]:
        import av

        stream = self.container.streams.video[0]
        next_time, index, time = 0.0, -1, 0.0
        try:
            for index, frame in enumerate(self.container.decode(stream)):
                time = float(frame.time) if frame.time is not None else index / (self.rate or 1.0)
                if self.fps is not None:
                    if time + 1e-6 < next_time:
                        continue
                    next_time = (math.floor(time * self.fps + 1e-6) + 1) / self.fps
                if frame.width * frame.height > self.limits.max_pixels:
                    raise BadRequest(413, f"{self.name}: frame {index} is {frame.width}x{frame.height} "
                                     f"pixels, over the limit of {self.limits.max_pixels:,}")  # fmt: skip
                if self.taken == self.limits.max_frames:
                    raise BadRequest(413, self._too_long())
                self.taken += 1
                self.times.append(round(time, 4))
                image = to_image_tensor(frame.to_ndarray(format="rgb24"), self.name)
                yield Frame(Path(self.name), image, index)
        except av.FFmpegError as exc:
            if not self.taken:
                raise BadRequest(400, f"{self.name}: a truncated or corrupt video ({exc})") from None
            self.note = f"the video ends in damage after frame {index}: {exc}"
        finally:
            self.container.close()
        if not self.taken:
            raise BadRequest(400, f"{self.name}: a video without a frame")
        step = 1 / self.rate if self.rate else 0.0
        if self.note is None and self.duration and time + 2.5 * step < self.duration:
            self.note = (
                f"the frames end at {time:g} s of the {self.duration:g} s the file announces (cut short?)"
            )

    def _too_long(self) -> str:
        rate = f"at {self.fps:g} frames per second" if self.fps else "(every frame)"
        return (f"{self.name}: more than {self.limits.max_frames} frames {rate}; send a shorter clip "
                "or a lower ?fps=")  # fmt: skip


def open_video(data: bytes, name: str, limits: Limits, fps: float | None) -> Video:
    """An uploaded video, checked before its frames are decoded: bytes, a video stream, its frame size,
    and (when the container says how long it is) the frames ``fps`` would take from it."""
    try:
        import av
    except ImportError:
        raise BadRequest(415, f"{name}: this server reads no video (pip install 'cnnkit[video]')") from None
    if len(data) > limits.max_video_bytes:
        raise BadRequest(413, f"{name}: {len(data):,} bytes, over the limit of {limits.max_video_bytes:,}")
    if not data:
        raise BadRequest(400, f"{name}: empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadRequest(400, f"{name}: not a video PyAV can read, or one cut short ({exc})") from None
    if not container.streams.video:
        container.close()
        raise BadRequest(400, f"{name}: holds no video stream (not a video, or one cut short)")
    stream = container.streams.video[0]
    video = Video(name, container, fps, limits, stream.codec_context.width, stream.codec_context.height)
    video.rate = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration is not None and stream.time_base is not None:
        video.duration = round(float(stream.duration * stream.time_base), 3)
    elif container.duration is not None:
        video.duration = round(container.duration / 1_000_000, 3)
    if video.width * video.height > limits.max_pixels:
        container.close()
        raise BadRequest(413, f"{name}: {video.width}x{video.height} pixels a frame, over the limit of "
                         f"{limits.max_pixels:,}")  # fmt: skip
    expected = (video.duration or 0) * min(fps or math.inf, video.rate or math.inf)
    if math.isfinite(expected) and expected > limits.max_frames + 1:
        container.close()
        raise BadRequest(413, video._too_long() + f" (it lasts {video.duration:g} s)")
    return video


def is_video_upload(kind: str, name: str, data: bytes) -> bool:
    """A part or body to read as a video: its content type says so, or (for the generic types browsers
    and curl send) its file name or its first bytes do (MP4/MOV, Matroska/WebM, AVI, MPEG)."""
    if kind.startswith("video/"):
        return True
    if kind not in ("", "application/octet-stream"):
        return False
    head = data[:12]
    magic = (
        head[4:8] == b"ftyp"
        or head.startswith(b"\x1a\x45\xdf\xa3")
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith((b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"))
    )
    return magic or name.lower().endswith(VIDEO_EXTENSIONS)


def parse_fps(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        fps = float(text)
    except ValueError:
        fps = -1.0
    if not (math.isfinite(fps) and fps > 0):
        raise BadRequest(400, f"option fps: {text!r} is not a positive number of frames per second")
    return fps


async def read_uploads(request: Any, limits: Limits, fps: float | None) -> list[Frame | Video]:
    """The request's images (decoded) and videos (opened), in the order sent: ``multipart/form-data``
    files, or one raw ``image/*`` / ``video/*`` / ``application/octet-stream`` body."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images, max_fields=limits.max_images)
        except Exception as exc:  # starlette's parser errors: a malformed or oversized form
            raise BadRequest(400, f"unreadable multipart form ({exc})") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest(400, "the form holds no files")
        limit = max(limits.max_bytes, limits.max_video_bytes)  # which one applies is known once read
        blobs = [(f.filename or f"image{i}", (f.content_type or "").lower(), await f.read(limit + 1))
                 for i, f in enumerate(files)]  # fmt: skip
    elif kind.startswith(("image/", "video/")) or kind == "application/octet-stream":
        limit = {"image": limits.max_bytes, "video": limits.max_video_bytes}.get(
            kind.split("/")[0],
            max(limits.max_bytes, limits.max_video_bytes),  # octet-stream: either
        )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"the body is over the limit of {limit:,} bytes")
        blobs = [("video0" if kind.startswith("video/") else "image0", kind, bytes(body))]
    else:
        raise BadRequest(415, "send images or videos as multipart/form-data or as an image/* or video/* "
                         f"body, not {kind or 'nothing'}")  # fmt: skip
    return [
        await run_in_threadpool(open_video, data, name, limits, fps)
        if is_video_upload(part_kind, name, data)
        else await run_in_threadpool(decode, data, name, limits)
        for name, part_kind, data in blobs
    ]
