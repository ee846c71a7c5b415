"""Reading the upload: raw audio body or multipart `file`, with the byte limit enforced while
streaming (an oversized upload is refused after `limit` bytes, not after buffering it all)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from contract.audio import SUPPORTED_TEXT
from service.errors import (
    BadRequest,
    ClientGone,
    EmptyBody,
    PayloadTooLarge,
    UnsupportedMediaType,
)

AUDIO_MEDIA_TYPES = frozenset(
    {
        "audio/wav",
        "audio/x-wav",
        "audio/wave",
        "audio/vnd.wave",
        "audio/flac",
        "audio/x-flac",
        "audio/ogg",
        "audio/opus",
        "audio/mpeg",
        "audio/mp3",
        "application/octet-stream",
    }
)
MULTIPART = "multipart/form-data"


def _too_large(limit: int) -> PayloadTooLarge:
    # Connection: close, so the client stops sending the rest instead of us draining it.
    return PayloadTooLarge(
        f"upload exceeds the {limit}-byte limit", headers={"Connection": "close"}
    )


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    total = 0
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            yield chunk
    except ClientDisconnect:  # gone mid-upload: nobody to answer (499, not a logged 500)
        raise ClientGone from None


async def read_audio_bytes(request: Request, limit: int) -> bytes:
    """The audio bytes of a classify request. Raises 400 / 413 / 415 service errors."""
    media = request.headers.get("content-type", "application/octet-stream")
    media = media.split(";")[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    if media == MULTIPART:
        data = await _read_multipart(request, limit)
    elif media in AUDIO_MEDIA_TYPES:
        data = b"".join([c async for c in _limited(request.stream(), limit)])
    else:
        raise UnsupportedMediaType(
            f"Content-Type {media!r} is not accepted: send the file's bytes as audio/wav, "
            f"audio/flac, audio/ogg, audio/mpeg or application/octet-stream, or "
            f"{MULTIPART} with a 'file' field ({SUPPORTED_TEXT})"
        )
    if not data:
        raise EmptyBody("the request has no audio bytes")
    return data


async def _read_multipart(request: Request, limit: int) -> bytes:
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=4)
    parser.spool_max_size = limit  # keep the part in memory: no temp file per request
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest(f"{MULTIPART} needs a 'file' field holding the audio")
    try:
        return await upload.read()
    finally:
        await form.close()
