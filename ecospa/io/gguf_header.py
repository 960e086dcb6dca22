"""Bounded reading of a GGUF file's header: every count and length is checked against the bytes
the file holds before ``gguf.GGUFReader`` allocates anything from them."""
from __future__ import annotations

import mmap
import os
import struct


def gguf_module():
    """The optional ``gguf`` package, or ValueError saying how to install it."""
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ValueError("reading GGUF files needs the 'gguf' package: pip install gguf") from err
    return gguf


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 4_000_000  # all metadata arrays together (a 256K vocabulary needs ~1M)
MAX_DIMS = 4                 # GGML_MAX_DIMS


def check_header(path) -> dict:
    """Walk a GGUF file's header, metadata and tensor infos with every count and length bounded
    by the bytes the file holds, BEFORE ``gguf.GGUFReader`` builds anything from them (it
    allocates per declared array element, so a 100-byte file declaring 2**40 elements would
    exhaust memory). Returns {"version", "tensors", "kvs", "data_offset"}; ValueError naming the
    field otherwise. Reads the file through mmap: no allocation beyond a few small objects."""

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path!r} is not a GGUF file: {size} bytes is shorter than the header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic)")
        order = "<"
        version = struct.unpack_from("<I", m, 4)[0]
        if version & 0xFFFF == 0:
            order, version = ">", struct.unpack_from(">I", m, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 or 3 are)")
        pos = 8
        items = 0

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise ValueError(f"{path!r}: GGUF {what} needs {n} bytes at offset {pos}, but the "
                                 f"file has {size} bytes (truncated or corrupt file)")

        def u(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n, what)
            v = struct.unpack_from(order + fmt, m, pos)[0]
            pos += n
            return v

        def string(what: str) -> bytes:
            nonlocal pos
            n = u("Q", what + " length")
            need(n, what)
            out = m[pos:pos + n] if n <= 4096 else b""
            pos += n
            return out

        def value(kind: int, what: str, depth: int = 0) -> None:
            nonlocal pos, items
            if kind in _SCALARS:
                need(_SCALARS[kind], what)
                pos += _SCALARS[kind]
            elif kind == _STRING:
                string(what)
            elif kind == _ARRAY:
                if depth > 1:
                    raise ValueError(f"{path!r}: GGUF field {what!r} nests arrays too deeply")
                inner = u("I", what + " element type")
                count = u("Q", what + " length")
                unit = _SCALARS.get(inner, 8 if inner == _STRING else 12 if inner == _ARRAY else 0)
                if unit == 0:
                    raise ValueError(f"{path!r}: GGUF field {what!r} has unknown element type {inner}")
                if count * unit > size - pos:
                    raise ValueError(f"{path!r}: GGUF field {what!r} declares {count} elements, "
                                     f"more than the {size - pos} remaining bytes can hold "
                                     "(truncated or corrupt file)")
                items += count
                if items > MAX_ARRAY_ITEMS:
                    raise ValueError(f"{path!r}: GGUF field {what!r}: metadata arrays hold more "
                                     f"than {MAX_ARRAY_ITEMS} elements; not a model ecospa reads")
                if inner in _SCALARS:
                    pos += count * unit
                else:
                    for _ in range(count):
                        value(inner, what, depth + 1)
            else:
                raise ValueError(f"{path!r}: GGUF field {what!r} has unknown value type {kind}")

        n_tensors = u("Q", "tensor count")
        n_kv = u("Q", "metadata count")
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:
            raise ValueError(f"{path!r}: GGUF header declares {n_kv} metadata fields and "
                             f"{n_tensors} tensors, more than {size} bytes can hold (corrupt file)")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata key {i}").decode("utf-8", errors="replace")
            kind = u("I", f"type of {key!r}")
            start = pos
            value(kind, key)
            if key == "general.alignment":
                if kind != 4:
                    raise ValueError(f"{path!r}: GGUF general.alignment must be a uint32")
                alignment = struct.unpack_from(order + "I", m, start)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise ValueError(f"{path!r}: GGUF general.alignment {alignment} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor {i} name").decode("utf-8", errors="replace")
            n_dims = u("I", f"tensor {name!r} rank")
            if n_dims > MAX_DIMS:
                raise ValueError(f"{path!r}: GGUF tensor {name!r} has {n_dims} dims (at most {MAX_DIMS})")
            dims = [u("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
            kind = u("I", f"tensor {name!r} type")
            offset = u("Q", f"tensor {name!r} offset")
            infos.append((name, dims, kind, offset))
        data_offset = pos + (-pos % alignment)
    _check_data_section(path, infos, data_offset, alignment, size)
    return {"version": version, "tensors": len(infos), "kvs": n_kv, "data_offset": data_offset}


def _check_data_section(path: str, infos: list, data_offset: int, alignment: int, size: int) -> None:
    """Every byte of the data section belongs to one tensor or to alignment padding: each tensor
    starts at an aligned offset, takes the bytes its shape and type imply, inside the file, and
    the next tensor (by offset) starts right after its padding; the file ends with the last
    tensor's data and padding. A wrong tensor count, shape, type or offset in the header breaks
    this tiling (otherwise every later tensor would be read from shifted bytes)."""
    sizes = _quant_sizes()
    extents = []
    for name, dims, kind, offset in infos:
        n = 1
        for d in dims:
            n *= d
        if kind not in sizes:
            raise ValueError(f"{path!r}: GGUF tensor {name!r} has unknown type {kind}")
        block, nbytes = sizes[kind]
        if n % block:
            raise ValueError(f"{path!r}: GGUF tensor {name!r}: {n} values are not whole "
                             f"blocks of {block}")
        end = data_offset + offset + n // block * nbytes
        if end > size:
            raise ValueError(f"{path!r}: GGUF tensor {name!r} (shape {dims}) needs bytes up to "
                             f"{end}, but the file has {size} (truncated or corrupt file)")
        if offset % alignment:
            raise ValueError(f"{path!r}: GGUF tensor {name!r} starts at data offset {offset}, not a "
                             f"multiple of the file's alignment {alignment} (corrupt tensor info)")
        extents.append((offset, offset + n // block * nbytes, name, dims, kind))
    extents.sort()
    free, last = 0, None  # where the next tensor must start; the tensor before it
    for start, stop, name, dims, kind in extents:
        what = (f"{last[2]!r} (shape {last[3]}, type {_type_name(last[4])}) needs {last[1] - last[0]} bytes "
                f"from data offset {last[0]}" if last else "the data section starts at offset 0")
        if start < free:
            raise ValueError(f"{path!r}: GGUF tensors {last[2]!r} and {name!r} overlap: {what}, but "
                             f"{name!r} starts at {start}; a tensor's shape, type or offset in the "
                             "header is wrong (corrupt file)")
        if start > free:
            raise ValueError(f"{path!r}: GGUF data bytes {free}..{start} are not accounted for by any "
                             f"tensor: {what}, but {name!r} starts at {start}; a tensor's shape, type "
                             "or offset in the header is wrong (corrupt file)")
        free, last = stop + (-stop % alignment), (start, stop, name, dims, kind)
    held = size - data_offset
    if held > free:
        raise ValueError(f"{path!r}: the last {held - (last[1] if last else 0)} bytes of this GGUF "
                         f"file are not accounted for by its {len(infos)} tensors (the data section "
                         f"holds {held} bytes, the tensors and their alignment padding {free}); the "
                         "header's tensor count is too low or bytes were appended (corrupt file)")


def _type_name(kind: int) -> str:
    try:
        return gguf_module().GGMLQuantizationType(kind).name
    except ValueError:
        return str(kind)


def _quant_sizes() -> dict:
    gguf = gguf_module()
    return {int(k): (int(v[0]), int(v[1])) for k, v in gguf.GGML_QUANT_SIZES.items()}


__all__ = ["check_header", "gguf_module", "MAX_ARRAY_ITEMS", "MAX_DIMS"]
