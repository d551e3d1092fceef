"""The output folder of a reproduction: what ntkit wrote there, and nothing else touched.

A folder becomes an ntkit run folder when ntkit writes its manifest, ``.ntkit-run.json``,
into it. The manifest lists every file ntkit wrote (paths relative to the folder, ``/``
separated) with the SHA-256 of what it wrote. The rules that follow from it:

- ntkit writes into a folder that is absent, empty, or already an ntkit run folder. A
  non-empty folder without a manifest is someone else's: ntkit refuses it unless told
  ``force=True``.
- ntkit overwrites a file only if the manifest lists it and its bytes are still the ones
  ntkit wrote. A file ntkit did not write, or one changed since (a ``report.md`` with the
  user's notes), is never overwritten or deleted, ``force`` or not: the run refuses and
  names it. Files with names ntkit does not use are never touched.
- Every write is atomic (a temporary file, then a rename), and the manifest accepts both
  the old and the new bytes while the rename happens, so an interruption never leaves a
  file that the next run would take for the user's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = ".ntkit-run.json"
_PARTIAL = ".ntkit-partial"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        return _digest(path.read_bytes())
    except OSError:
        return None


class RunDir:
    """An output folder and the manifest of the files ntkit wrote into it.

    ``RunDir(out)`` only reads; nothing is created until :meth:`claim`.
    """

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.files: dict[str, list[str]] = {}
        self.has_manifest = False
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
                files = saved["files"]
                if not isinstance(files, dict):
                    raise TypeError
                self.files = {str(k): [str(h) for h in v] for k, v in files.items()}
                self.has_manifest = True
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"{str(manifest)!r} is not a readable ntkit manifest ({err!r}), so ntkit "
                    "cannot tell its own files from yours in that folder. Choose another "
                    "--out, or move the folder's contents away and delete the manifest."
                ) from err

    # --------------------------------------------------------------------- inspection
    def foreign_entries(self) -> list[str]:
        """Entries of the folder when it is non-empty and has no manifest (sorted)."""
        if self.has_manifest or not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir())

    def owns(self, rel: str) -> bool:
        """Whether ``rel`` holds bytes ntkit wrote (absent files are not owned)."""
        digest = _file_digest(self.path / rel)
        return digest is not None and digest in self.files.get(rel, ())

    def blocked(self, rels: list[str]) -> list[str]:
        """The targets among ``rels`` that exist but are not ntkit's unchanged files."""
        return [rel for rel in rels if (self.path / rel).exists() and not self.owns(rel)]

    def check_targets(self, rels: list[str], force: bool, resume: bool = False) -> None:
        """Refuse, before any work, a folder or target files that are not ntkit's.

        Raises ``ValueError`` naming what was found and the options.
        """
        found = self.foreign_entries()
        if found and not force:
            shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8
                                            else "")
            what = ("--resume continues only a run ntkit started there" if resume
                    else "ntkit will not write into it")
            raise ValueError(
                f"{str(self.path)!r} is not empty and was not created by ntkit (it has no "
                f"{MANIFEST}); it holds: {shown}. {what}. Options: choose a new or empty "
                "folder with --out, or pass --force to add ntkit's files beside these "
                "(ntkit never overwrites or deletes a file it did not write, even with "
                "--force).")
        clash = self.blocked(rels)
        if clash:
            raise ValueError(
                f"{str(self.path)!r} holds files that ntkit would write but did not write, or "
                f"that were changed since ntkit wrote them: {', '.join(clash)}. ntkit never "
                "overwrites them, even with --force. Move or rename them (or, for a new run, "
                "choose another folder with --out).")

    def check_writable(self, folders: list[str]) -> None:
        """Create ``folders`` (relative, ``""`` is the run folder) and prove each writable.

        Raises ``ValueError`` naming the folder, before any computation is spent.
        """
        for rel in folders:
            folder = self.path / rel if rel else self.path
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".ntkit-write-test-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as err:
                raise ValueError(
                    f"Cannot write results to {str(folder)!r}: {err.strerror or err}. Make it "
                    "a writable folder or choose another directory with --out.") from err

    # ------------------------------------------------------------------------ writing
    def claim(self) -> None:
        """Create the folder and write the manifest: from now on it is a run folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._save_manifest()
        self.has_manifest = True

    def _save_manifest(self) -> None:
        manifest = self.path / MANIFEST
        partial = manifest.with_name(MANIFEST + _PARTIAL)
        partial.write_text(json.dumps({"written_by": "ntkit", "files": self.files},
                                      indent=1, sort_keys=True))
        partial.replace(manifest)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically, refusing a file ntkit did not write."""
        target = self.path / rel
        if target.exists() and not self.owns(rel):
            raise ValueError(f"{str(target)!r} was not written by ntkit (or was changed "
                             "since); ntkit does not overwrite it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + _PARTIAL)
        partial.write_bytes(data)
        new = _digest(data)
        old = self.files.get(rel, []) if target.exists() else []
        # both accepted while the rename happens: an interruption leaves either, both ntkit's
        self.files[rel] = sorted(set(old) | {new})
        self._save_manifest()
        partial.replace(target)
        self.files[rel] = [new]
        self._save_manifest()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def set_aside(self, rel: str, suffix: str = "damaged") -> str:
        """Rename ``rel`` to ``rel.<suffix>`` (numbered if taken); return the new name.

        Used for a damaged checkpoint: kept for inspection, never deleted.
        """
        target = self.path / rel
        new = f"{rel}.{suffix}"
        n = 1
        while (self.path / new).exists():
            n += 1
            new = f"{rel}.{suffix}{n}"
        target.rename(self.path / new)
        if rel in self.files:
            del self.files[rel]
            self._save_manifest()
        return new

    def remove_owned(self, rel: str) -> bool:
        """Delete ``rel`` only if it is ntkit's unchanged file; return whether it was."""
        if not self.owns(rel):
            return False
        (self.path / rel).unlink()
        del self.files[rel]
        self._save_manifest()
        return True
