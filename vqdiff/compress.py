"""Token grids to bytes and back, range-coded under the next-token model's distributions.

A learned prior is a compression model: -log2 p(ids) bits is the size an entropy coder reaches
(Shannon; the VQ-VAE papers report it as bits per token). Here the coder is real:
`compress_ids(ar, ids) -> bytes`, `decompress_ids(ar, data) -> (ids, label)`.

The entropy coder is constriction's range coder (`constriction.stream.queue`, Bamler 2022), a kept
library with exact, tested integer arithmetic, rather than a hand-written coder.

Arithmetic coding fails if the decoder's model differs from the encoder's by one ulp, so:
- both sides run the same path, `ARTransformer.next_logits` through the KV cache one token at a
  time with batch 1 (a batched pass, or another batch size, may pick other matmul kernels and
  give other floats), in fp32 on the CPU, without autocast, with one thread (so that no kernel
  splits a reduction across threads differently on the two sides);
- the probabilities are quantised to integer frequencies summing to 2^20 with every id >= 1 (so
  every id stays codable), and constriction only ever sees those integers.
Files decode on the machine that wrote them, or one with the same torch build and CPU kind:
other SIMD kernels can round differently, and the checksum then reports a corrupt decode
(`decompress_ids` re-checks the decoded ids against the checksum of the source ids).

The file (`.vqd`); `v` is an unsigned LEB128 varint (one byte below 128), so the header of an
8x8 grid of 512 codes is 18 bytes and the checks 6:

    magic "VQD" | version u8 | v grid h | v grid w | v codebook size k | v class + 1 (0: none)
    | tokenizer hash 4 bytes | AR weights hash 4 bytes | v payload length | payload
    | crc32 of the ids u32 LE | crc32 of everything before it, low 16 bits, u16 LE

The 16-bit frame check names a damaged file before any decoding; the 32-bit check of the ids is
the guarantee, checked after decoding: it also catches a payload damaged past the frame check,
and a machine that computes other probabilities.

The payload is the range coder's 32-bit words, big-endian, cut to the shortest prefix (or prefix
rounded up by one) that still decodes to the same ids: the coder's sealing writes up to a whole
word more than the information needs, 2 bytes on average, and on a 64-token grid that is ~10%.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from vqdiff.trunk import KVCache

MAGIC = b"VQD"
VERSION = 1
FREQ_BITS = 20  # integer frequencies sum to 2^20; constriction's range coder works at 2^24
TOTAL = 1 << FREQ_BITS
HASH_BYTES = 4
CHECK_BYTES = 6  # crc32 of the ids + 16-bit frame check


class CompressError(Exception):
    """A .vqd file that is truncated, corrupt, or made with other weights; the message is one line."""


@dataclass(frozen=True)
class Header:
    """What a .vqd file says about itself."""

    grid: tuple[int, int]
    codebook_size: int
    label: int | None  # the class the ids were coded under; None = the null class
    tokenizer_hash: bytes
    ar_hash: bytes
    payload: bytes
    ids_crc: int
    overhead: int  # bytes of the file that are not payload: header and checks


# ---------------------------------------------------------------- hashes and frequencies


def weights_hash(model: nn.Module) -> bytes:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes), first HASH_BYTES bytes.

    Computed from the tensors, not the file, so it needs no path; the same weights give the same
    hash whether they were just trained or loaded.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:HASH_BYTES]


def frequencies(logits: Tensor) -> np.ndarray:
    """logits float [k] -> int64 [k], every entry >= 1, summing to TOTAL = 2^20.

    floor(p (TOTAL - k)) + 1 leaves TOTAL - sum >= 0 over; it goes to the most likely id (the
    first one on a tie), a deterministic rule that costs the least. The floor costs < k / TOTAL
    of the mass, about 0.001 bits per token at k = 512.
    """
    k = logits.shape[-1]
    p = torch.softmax(logits.double(), dim=-1).numpy()
    freq = np.floor(p * (TOTAL - k)).astype(np.int64) + 1
    freq[int(np.argmax(freq))] += TOTAL - int(freq.sum())
    return freq


# ---------------------------------------------------------------- the model, one token at a time


@contextlib.contextmanager
def _coding_mode(ar: nn.Module) -> Iterator[None]:
    """eval, no grad, no autocast, one thread: the conditions both sides share (see the module doc)."""
    param = next(ar.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(f"the coder needs the AR model in float32 on the CPU, got {param.dtype} on {param.device}")
    was_training, threads = ar.training, torch.get_num_threads()
    ar.eval()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.set_num_threads(threads)
        ar.train(was_training)


class _Prior:
    """The AR model's next-token frequencies for one grid, cell by cell, through the KV cache."""

    def __init__(self, ar: nn.Module, label: int | None) -> None:
        self.ar = ar
        self.cache = KVCache(ar.trunk.seq_len)
        self.labels = None if label is None else torch.tensor([label])  # None: the null class
        self.pending = torch.zeros(1, 0, dtype=torch.long)  # batch 1, on both sides

    def next_frequencies(self) -> np.ndarray:
        logits = self.ar.next_logits(self.pending, self.labels, self.cache)  # [1 k]
        return frequencies(logits[0])

    def push(self, token: int) -> None:
        self.pending = torch.tensor([[token]])


# ---------------------------------------------------------------- the range coder


def _family():
    import constriction

    # perfect=False: constriction's fast, deterministic fixed-point conversion (its recommended
    # setting); encoder and decoder must agree on it, and both call this function
    return constriction.stream.model.Categorical(perfect=False)


def _encode(symbols: np.ndarray, table: np.ndarray) -> bytes:
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols.astype(np.int32), _family(), table.astype(np.float64))
    return encoder.get_compressed().astype(">u4").tobytes()


def _decoder(payload: bytes):
    import constriction

    padded = payload + bytes(-len(payload) % 4)  # a cut payload is zero-filled to whole words
    words = np.frombuffer(padded, dtype=">u4").astype(np.uint32)
    return constriction.stream.queue.RangeDecoder(words)


def _decode_one(decoder, freq: np.ndarray) -> int:
    return int(decoder.decode(_family(), freq[None].astype(np.float64))[0])


def _decodes_to(payload: bytes, symbols: np.ndarray, table: np.ndarray) -> bool:
    try:
        decoder = _decoder(payload)
        return all(_decode_one(decoder, table[i]) == s for i, s in enumerate(symbols.tolist()))
    except (ValueError, RuntimeError, AssertionError):  # constriction refusing a cut stream
        return False


def _shortest(payload: bytes, symbols: np.ndarray, table: np.ndarray) -> bytes:
    """The shortest prefix of `payload`, or that prefix plus one, that decodes to `symbols`.

    Any number inside the coder's final interval decodes the message; the sealed words pin more
    digits than needed. Every candidate is checked by the real decoder against the stored
    frequency table (no model call), so the result always decodes.
    """
    best = payload
    for length in range(len(payload) - 1, -1, -1):
        prefix = payload[:length]
        up = int.from_bytes(prefix, "big") + 1 if length else None
        candidates = [prefix] + ([up.to_bytes(length, "big")] if up is not None and up < 256**length else [])
        found = next((c for c in candidates if _decodes_to(c, symbols, table)), None)
        if found is None:
            break
        best = found
    return best


# ---------------------------------------------------------------- files


def _check_label(label: int | None, num_classes: int) -> None:
    if label is None:
        return
    if num_classes == 0:
        raise ValueError("a class was given but the AR model is unconditional")
    if not 0 <= label < num_classes:
        raise ValueError(f"class must be in [0, {num_classes}), got {label}")


@dataclass(frozen=True)
class Encoded:
    """A compressed grid and what it cost: `ideal_bits` = sum of -log2(freq / 2^20) over the cells,
    the size an ideal coder reaches under the integer frequencies (the file adds the coder's
    termination, under a byte, and the header)."""

    data: bytes
    ideal_bits: float


def compress_ids(
    ar: nn.Module,
    ids: Tensor,
    label: int | None = None,
    *,
    tokenizer_hash: bytes | None = None,
    ar_hash: bytes | None = None,
) -> bytes:
    """One token grid -> the bytes of a .vqd file.

    ids: long [h w] in [0, k), the AR model's grid. label: a class in [0, num_classes) for a
    class-conditional model, or None to code under the null class. tokenizer_hash: recorded so
    that the decoder can refuse another tokenizer (`weights_hash(tokenizer)`; None records zeros).
    ar_hash: `weights_hash(ar)`, computed when None (pass it to skip the hashing per call).
    The AR model must be float32 on the CPU. The same inputs always give the same bytes.
    """
    return encode_grid(ar, ids, label, tokenizer_hash=tokenizer_hash, ar_hash=ar_hash).data


def _check_one_id_per_position(cfg) -> None:
    if getattr(cfg, "group", 1) > 1:
        raise CompressError(
            f"the .vqd codec codes one id per position, and this ar generator reads {cfg.group}x{cfg.group} groups; "
            "compress with an ar generator of group = 1"
        )


def encode_grid(
    ar: nn.Module,
    ids: Tensor,
    label: int | None = None,
    *,
    tokenizer_hash: bytes | None = None,
    ar_hash: bytes | None = None,
) -> Encoded:
    """`compress_ids`, with the ideal size under the integer frequencies (for benchmarks)."""
    cfg = ar.cfg
    _check_one_id_per_position(cfg)
    h, w, k = cfg.grid_h, cfg.grid_w, cfg.codebook_size
    if tuple(ids.shape) != (h, w):
        raise ValueError(f"ids must be long [{h} {w}], got {list(ids.shape)}")
    if ids.min() < 0 or ids.max() >= k:
        raise ValueError(f"ids must be in [0, {k})")
    if k >= TOTAL // 2:
        raise ValueError(f"codebook size {k} is too large for {FREQ_BITS}-bit frequencies")
    _check_label(label, cfg.num_classes)
    symbols = ids.reshape(-1).cpu().numpy().astype(np.int64)
    with _coding_mode(ar):
        prior, rows = _Prior(ar, label), []
        for s in symbols.tolist():
            rows.append(prior.next_frequencies())
            prior.push(s)
    table = np.stack(rows)  # [n k]
    payload = _shortest(_encode(symbols, table), symbols, table)
    ar_hash = ar_hash if ar_hash is not None else weights_hash(ar)
    head = MAGIC + bytes([VERSION]) + b"".join(_varint(v) for v in (h, w, k, 0 if label is None else label + 1))
    head += _hash_field(tokenizer_hash) + _hash_field(ar_hash) + _varint(len(payload))
    body = head + payload + struct.pack("<I", _ids_crc(symbols))
    ideal = float(-np.log2(table[np.arange(len(symbols)), symbols] / TOTAL).sum())
    return Encoded(body + struct.pack("<H", zlib.crc32(body) & 0xFFFF), ideal)


def read_header(data: bytes) -> Header:
    """Parse and check a .vqd file's framing (magic, version, length, frame check); no model needed."""
    data = bytes(data)
    if data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and data and MAGIC.startswith(data):
            raise CompressError(f"truncated: {len(data)} bytes")
        raise CompressError("not a .vqd file (no VQD magic number)")
    reader = _Reader(data, len(MAGIC))
    version = reader.take(1)[0]
    if version != VERSION:
        raise CompressError(f"format version {version} is not supported (this vqdiff reads version {VERSION})")
    h, w, k, label = (reader.varint() for _ in range(4))
    tok, arh = reader.take(HASH_BYTES), reader.take(HASH_BYTES)
    length = reader.varint()
    start = reader.pos
    expected = start + length + CHECK_BYTES
    if len(data) < expected:
        raise CompressError(f"truncated: {len(data)} of {expected} bytes")
    if len(data) > expected:
        raise CompressError(f"corrupt: {len(data) - expected} bytes after the end of the file")
    (ids_crc,) = struct.unpack_from("<I", data, start + length)
    (check,) = struct.unpack_from("<H", data, expected - 2)
    if zlib.crc32(data[: expected - 2]) & 0xFFFF != check:
        raise CompressError("corrupt: the frame check fails")
    payload = data[start : start + length]
    return Header((h, w), k, label - 1 if label else None, tok, arh, payload, ids_crc, len(data) - length)


def decompress_ids(
    ar: nn.Module, data: bytes, *, tokenizer_hash: bytes | None = None, ar_hash: bytes | None = None
) -> tuple[Tensor, int | None]:
    """The bytes of a .vqd file -> (ids long [h w] in [0, k), label or None).

    Refuses (CompressError, one line) a truncated or corrupt file, and one made with other AR
    weights or another tokenizer (`tokenizer_hash` as given to `compress_ids`).
    """
    header = read_header(data)
    cfg = ar.cfg
    _check_one_id_per_position(cfg)
    mine = ar_hash if ar_hash is not None else weights_hash(ar)
    if header.ar_hash != mine:
        raise CompressError(
            f"made with other AR weights ({header.ar_hash.hex()}, these are {mine.hex()}); "
            "decompress it with the run that compressed it"
        )
    if header.tokenizer_hash != _hash_field(tokenizer_hash):
        raise CompressError(
            f"made with another tokenizer ({header.tokenizer_hash.hex()}, this one is "
            f"{_hash_field(tokenizer_hash).hex()}); decompress it with the run that compressed it"
        )
    if header.grid != (cfg.grid_h, cfg.grid_w) or header.codebook_size != cfg.codebook_size:
        raise CompressError(
            f"holds a {header.grid[0]}x{header.grid[1]} grid of {header.codebook_size} codes, the AR model "
            f"codes a {cfg.grid_h}x{cfg.grid_w} grid of {cfg.codebook_size}"
        )
    try:
        _check_label(header.label, cfg.num_classes)
    except ValueError as e:
        raise CompressError(f"corrupt: {e}") from None
    symbols = []
    with _coding_mode(ar):
        prior, decoder = _Prior(ar, header.label), _decoder(header.payload)
        for _ in range(cfg.grid_h * cfg.grid_w):
            try:
                s = _decode_one(decoder, prior.next_frequencies())
            except (AssertionError, ValueError, RuntimeError) as e:  # constriction asserts on an invalid stream
                raise CompressError(f"corrupt: the payload is not a valid range-coded stream ({e})") from None
            symbols.append(s)
            prior.push(s)
    symbols_np = np.asarray(symbols, dtype=np.int64)
    if _ids_crc(symbols_np) != header.ids_crc:
        # damage the 16-bit frame check missed, or a model that computed other probabilities
        raise CompressError(
            "decoded ids fail their checksum: the payload is damaged, or this machine computes the AR "
            "model's probabilities differently from the one that compressed the file (another CPU kind or torch build)"
        )
    return torch.from_numpy(symbols_np).view(cfg.grid_h, cfg.grid_w), header.label


def _varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits a byte, low first, high bit = more bytes follow."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    """Reads a header front to back; running out of bytes is a truncated file."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CompressError(f"truncated: {len(self.data)} bytes, the header is cut")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 35, 7):  # 5 bytes hold any u32
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise CompressError("corrupt: a header number is too long")


def _hash_field(value: bytes | None) -> bytes:
    if value is None:
        return bytes(HASH_BYTES)
    return bytes(value[:HASH_BYTES]).ljust(HASH_BYTES, b"\0")


def _ids_crc(symbols: np.ndarray) -> int:
    return zlib.crc32(symbols.astype("<u4").tobytes())
