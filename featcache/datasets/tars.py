"""Webdataset tar shards: ``wds:DIR``, ``wds:PATTERN`` and ``wds:SPLIT=PATTERN;SPLIT=PATTERN``.

``DIR`` is CLIP_benchmark's layout: one folder of shards per split (``DIR/train/0.tar``,
``DIR/test/0.tar``, ...) and ``DIR/classnames.txt``, one name a line (without it classes are
named by their numbers). A ``PATTERN`` names shards with braces as webdataset does
(``shards/train-{000000..000099}.tar``, ``{a,b}``); each shard's split is its folder's name or
the first word of its file name. A sample is the run of tar members sharing a key (the name up
to the first dot of its base name): its image is the ``jpg``, ``jpeg``, ``png`` or ``webp``
member, its label the integer in ``cls``; its id is the key, unique in its split.

Listing reads the tar headers and the ``cls`` members only; ``Split.load`` reads one image's
bytes at its offset in the shard. The standard library's ``tarfile`` serves: the ``webdataset``
package streams samples in order, where resume, subsets and torchrun ranks need random access.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.datasets.split import SPLITS, Split, open_image
from featcache.errors import DatasetError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# webdataset's sample key: the path up to the first dot of the base name.
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def webdataset(source: str, wanted: tuple[str, ...]) -> dict[str, Split]:
    """The splits of ``wds:SOURCE`` among ``wanted`` (no image is decoded)."""
    shards, names_file = _shards(source)
    splits = {}
    listed = {name: _list_split(name, paths) for name, paths in shards.items() if name in wanted}
    if not listed:
        raise DatasetError(f"wds:{source} has none of the splits {list(wanted)} ({sorted(shards)})")
    top = max(int(labels.max(initial=-1)) for _, labels, _, _ in listed.values())
    classes = _class_names(names_file, top + 1)
    for name, (ids, labels, sizes, where) in listed.items():
        if labels.size and labels.max() >= len(classes):
            raise DatasetError(
                f"{names_file} names {len(classes)} classes but the {name} shards have label "
                f"{int(labels.max())}"
            )
        splits[name] = Split(
            name=name,
            class_names=classes,
            ids=ids,
            labels=labels,
            sizes=sizes,
            where=where,
            reader=read_sample,
        )
    return splits


def read_sample(where: tuple[str, int, int, str]) -> Image.Image:
    """The image of a sample: ``size`` bytes at ``offset`` in a shard."""
    shard, offset, size, member = where
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    return open_image(data, f"{shard}:{member}")


# ---------------------------------------------------------------------------------------------
# Which shards


def _shards(source: str) -> tuple[dict[str, list[Path]], Path | None]:
    """{split: shards in order} and the class names file, if any."""
    if not source:
        raise DatasetError("wds: needs a folder or a shard pattern, e.g. wds:path/to/shards")
    if re.match(r"^\w+=", source):  # train=PATTERN;test=PATTERN
        shards = {}
        for part in filter(None, source.split(";")):
            name, _, pattern = part.partition("=")
            if not name or not pattern:
                raise DatasetError(f"wds:{source}: expected SPLIT=PATTERN;SPLIT=PATTERN")
            shards[name.strip()] = _expand(pattern.strip())
        return shards, _names_beside(next(iter(shards.values())))
    root = Path(source).expanduser()
    if root.is_dir():
        shards = {
            d.name: sorted(d.glob("*.tar"), key=_natural)
            for d in sorted(root.iterdir())
            if d.is_dir() and any(d.glob("*.tar"))
        }
        if not shards:
            raise DatasetError(
                f"{root} holds no folder of .tar shards; expected CLIP_benchmark's layout "
                f"({root}/train/0.tar, {root}/test/0.tar, ..., {root}/classnames.txt)"
            )
        names = root / "classnames.txt"
        return shards, names if names.is_file() else None
    paths = _expand(source)
    shards: dict[str, list[Path]] = {}
    for path in paths:
        shards.setdefault(_split_of(path, source), []).append(path)
    return shards, _names_beside(paths)


def _split_of(path: Path, pattern: str) -> str:
    first = re.split(r"[-_.]", path.name, maxsplit=1)[0]
    for name in (path.parent.name, first):
        if name in (*SPLITS, "val", "validation"):
            return name
    raise DatasetError(
        f"wds:{pattern}: cannot tell the split of {path} (neither its folder nor its name "
        "starts with train or test); name the splits: wds:train=PATTERN;test=PATTERN "
        "(or --split-patterns)"
    )


def _names_beside(paths: list[Path]) -> Path | None:
    """classnames.txt beside the shards or one folder up (CLIP_benchmark's root)."""
    for folder in (paths[0].parent, paths[0].parent.parent):
        if (folder / "classnames.txt").is_file():
            return folder / "classnames.txt"
    return None


def expand_braces(pattern: str) -> list[str]:
    """webdataset's patterns, as the braceexpand package expands them: ``{a,b}`` (nested
    too), ``{000..099}`` ranges (zero-padded to the wider bound when either has a leading zero;
    descending when the first is larger); a brace with neither stays as written."""
    start = pattern.find("{")
    while start >= 0:
        end = _closing(pattern, start)
        if end < 0:
            return [pattern]
        body = pattern[start + 1 : end]
        options = _range(body) or (_alternatives(body) if "," in _top_level(body) else None)
        if options is not None:
            head, tail = pattern[:start], pattern[end + 1 :]
            return [head + o + rest for o in options for rest in expand_braces(tail)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level(body: str) -> str:
    """``body`` with nested braces blanked out (to find its own commas)."""
    out, depth = [], 0
    for c in body:
        depth += c == "{"
        out.append(c if depth == 0 else " ")
        depth -= c == "}"
    return "".join(out)


def _alternatives(body: str) -> list[str]:
    cuts = [i for i, c in enumerate(_top_level(body)) if c == ","]
    parts = [body[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(body)])]
    return [x for part in parts for x in expand_braces(part)]


def _range(body: str) -> list[str] | None:
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m is None:
        return None
    lo, hi = m.groups()
    padded = any(len(b) > 1 and b.startswith("0") for b in (lo, hi))
    width = max(len(lo), len(hi)) if padded else 0
    step = 1 if int(hi) >= int(lo) else -1
    return [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]


def _expand(pattern: str) -> list[Path]:
    paths = [Path(p).expanduser() for p in expand_braces(pattern)]
    if not paths:
        raise DatasetError(f"wds:{pattern} names no shard")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"wds:{pattern}: {len(missing)} of {len(paths)} shards do not exist "
            f"(e.g. {', '.join(map(str, missing[:3]))})"
        )
    return paths


def _natural(path: Path):
    """0.tar, 1.tar, ..., 10.tar: numbers as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _class_names(path: Path | None, count: int) -> list[str]:
    if path is None:
        return [str(c) for c in range(count)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").rstrip().splitlines()]
    if not names or not all(names):
        raise DatasetError(
            f"{path}: one class name a line, line i naming class i; it has "
            + ("no name" if not names else f"a blank line {names.index('') + 1}")
        )
    return names


# ---------------------------------------------------------------------------------------------
# What a split's shards hold


def _list_split(name: str, shards: list[Path]):
    """ids, labels, image sizes and (shard, offset, size, member) of every sample, in order."""
    ids, labels, sizes, where = [], [], [], []
    seen: dict[str, Path] = {}
    for shard in shards:
        for key, label, member in _samples(shard):
            if key in seen:
                raise DatasetError(
                    f"sample key {key!r} appears twice in the {name} split ({seen[key]} and "
                    f"{shard}); keys must be unique in a split"
                )
            seen[key] = shard
            ids.append(key)
            labels.append(label)
            sizes.append(member.size)
            where.append((str(shard), member.offset_data, member.size, member.name))
    if not ids:
        raise DatasetError(f"the {name} shards ({shards[0]}, ...) hold no sample")
    return ids, np.asarray(labels, dtype=np.int64), sizes, where


def _samples(shard: Path):
    """(key, label, image member) of each sample of one shard, checked whole."""
    end = shard.stat().st_size
    try:
        with tarfile.open(shard, "r:") as tar:
            group: dict[str, tarfile.TarInfo] = {}
            key = None
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > end:
                    raise DatasetError(
                        f"shard {shard} is truncated: {member.name} ends past the end of the "
                        "file; copy it again"
                    )
                m = _KEY.match(member.name)
                if m is None:
                    continue  # no extension: not part of a sample
                if m.group(1) != key:
                    if key is not None:
                        yield _sample(shard, tar, key, group)
                    key, group = m.group(1), {}
                ext = m.group(2).lower()
                if ext in group:  # webdataset refuses it too
                    raise DatasetError(
                        f"shard {shard} holds {member.name} twice in sample {key!r}; "
                        "each entry of a sample once"
                    )
                group[ext] = member
            if key is not None:
                yield _sample(shard, tar, key, group)
            _check_end(shard, tar.offset, end)
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(
            f"shard {shard} is not a readable tar file ({exc}); copy it again"
        ) from exc


def _sample(shard: Path, tar: tarfile.TarFile, key: str, group: dict):
    image = next((group[k] for k in IMAGE_KEYS if k in group), None)
    if image is None or "cls" not in group:
        raise DatasetError(
            f"sample {key!r} in shard {shard} has {sorted(group)}; a sample needs an image "
            f"({', '.join(IMAGE_KEYS)}) and a cls label"
        )
    text = tar.extractfile(group["cls"]).read().decode("utf-8", "replace").strip()
    if not text.isdigit():
        raise DatasetError(f"sample {key!r} in shard {shard}: cls {text!r} is not a class number")
    return key, int(text), image


def _check_end(shard: Path, offset: int, end: int) -> None:
    """tarfile stops silently at a damaged header past the first, and at the end of a file cut
    between two members: what follows the last member it read must be the archive's end, zero
    blocks (at least one)."""
    if end - offset < 512:
        raise DatasetError(
            f"shard {shard} is truncated: it ends without the archive's end blocks after "
            f"byte {offset}; copy it again"
        )
    with open(shard, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise DatasetError(
                    f"shard {shard} is corrupt: a damaged tar header at byte {offset}; "
                    "copy it again"
                )
            offset += len(chunk)
