"""Include/exclude lists for a study: which subjects, sessions or images to run.

    sel = read_selection("qc_exclude.yml")
    sel.matches("sub-01", "ses-02", "sub-01/ses-02/anat/sub-01_ses-02_T2w.nii.gz")

One reader for plain text and the YAML that the QC page exports (a small reader of our own, no YAML
library):
- plain text: one entry per line; `#` starts a comment (at the start of a line or after a space).
- YAML: entries as a list (`- entry`), optionally under keys (`subjects:`, `files:`, `fail:`,
  `artifact:`, ...; the key does not change what an entry means), or a flow list (`files: [a, b]`).
  Quotes around an entry are removed.

What an entry means is read from its form:
- `sub-01` (or `sub-01/`): every image of that subject;
- `sub-01/ses-02` (or `sub-01_ses-02`): every image of that session;
- a path relative to the BIDS root (`sub-01/anat/sub-01_T2w.nii.gz`): that image; an absolute path
  matches the image whose relative path it ends with;
- a file name (`sub-01_T2w.nii.gz`, or without the extension): the image of that name, in any folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import InputError
from .io import nifti_stem

__all__ = ["Selection", "read_selection", "parse_selection"]

_KEY = re.compile(r"^([A-Za-z_][\w\-. ]*):(?:\s+(.*))?$")  # `key:` or `key: value` (not `C:\...`)
_NIFTI = (".nii.gz", ".nii")


@dataclass
class Selection:
    """Parsed entries of one list. `source`: where they were read (for messages)."""

    subjects: set = field(default_factory=set)   # "sub-01"
    sessions: set = field(default_factory=set)   # ("sub-01", "ses-02")
    paths: set = field(default_factory=set)      # "sub-01/anat/sub-01_T2w.nii.gz"
    names: set = field(default_factory=set)      # "sub-01_T2w.nii.gz" or the stem "sub-01_T2w"
    source: str = "the selection"

    def __len__(self) -> int:
        return len(self.subjects) + len(self.sessions) + len(self.paths) + len(self.names)

    def matches(self, subject, session, relpath) -> bool:
        """True when the image (subject label, session label or None, path relative to the BIDS root)
        is named by an entry."""
        sub = _prefixed(subject, "sub-")
        ses = _prefixed(session, "ses-") if session else None
        if sub in self.subjects or (ses is not None and (sub, ses) in self.sessions):
            return True
        rel = _norm_path(relpath)
        if rel in self.paths or any(p.startswith("/") and p.endswith("/" + rel) for p in self.paths):
            return True
        name = PurePosixPath(rel).name
        return name in self.names or nifti_stem(name) in self.names


def read_selection(path) -> Selection:
    """The entries of a plain-text or YAML list file; InputError if it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: selection file not found.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the selection file ({getattr(exc, 'strerror', None) or exc}).") from None
    return parse_selection(text, source=str(path))


def parse_selection(text: str, source: str = "the selection") -> Selection:
    sel = Selection(source=source)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line or line in ("---", "...") or line.startswith("%"):
            continue
        if line.startswith("- ") or line == "-":
            _add(sel, line[1:].strip(), source, number)
            continue
        key = _KEY.match(line)
        if key:
            value = (key.group(2) or "").strip()
            if value.startswith("[") and value.endswith("]"):
                for item in value[1:-1].split(","):
                    _add(sel, item.strip(), source, number)
            elif value:
                _add(sel, value, source, number)
            continue
        _add(sel, line, source, number)
    return sel


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    cut = re.search(r"\s#", line)
    return line[: cut.start()] if cut else line


def _unquote(entry: str) -> str:
    if len(entry) >= 2 and entry[0] == entry[-1] and entry[0] in "'\"":
        return entry[1:-1]
    return entry


def _add(sel: Selection, entry: str, source: str, number: int) -> None:
    entry = _unquote(entry.strip()).strip()
    if not entry:
        return
    norm = _norm_path(entry)
    parts = [p for p in norm.split("/") if p]
    if not parts:
        raise InputError(f"{source}, line {number}: '{entry}' names no subject, session or file.")
    last = parts[-1]
    is_file = any(last.lower().endswith(ext) for ext in _NIFTI) or len(parts) >= 3 or norm.startswith("/")
    if not is_file and len(parts) == 1:
        m = re.fullmatch(r"(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?", last)
        if m and m.group(2):
            sel.sessions.add((m.group(1), m.group(2)))
        elif m:
            sel.subjects.add(m.group(1))
        else:
            sel.names.add(last)  # a file name given without its extension
        return
    if not is_file and len(parts) == 2 and parts[0].startswith("sub-") and parts[1].startswith("ses-"):
        sel.sessions.add((parts[0], parts[1]))
        return
    if len(parts) == 1:
        sel.names.add(last)
    else:
        sel.paths.add(norm)


def _norm_path(p) -> str:
    s = str(p).replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return re.sub(r"/+", "/", s).rstrip("/") if s != "/" else s


def _prefixed(label, prefix: str) -> str:
    label = str(label)
    return label if label.startswith(prefix) else prefix + label
