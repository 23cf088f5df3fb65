"""The work tree of a task image, on the host: the repository SWE-bench-style images carry.

Image tasks (SWE-bench, SWE-Gym, SWE-smith rows; ``prepare_data.py --images``) bring no
repository path: the repository is the image's work directory (``/testbed``), next to the
environment that was installed against it. The rollout sandbox and the grader both need
it as a host directory, so that everything done with git stays the trusted host side's
(patch extraction through a private git directory, ``git apply`` of the model and test
patches, protected-file restoration), and the container sees it mounted back at the
image's work directory.

For each (image id, commit) one tree is prepared (``core.trees.PreparedTrees``) and copied
per use:

1. the image's work directory is streamed out of a created (never started) container
   (``get_archive``) and unpacked with tarfile's ``data`` filter (no absolute paths, no
   links leaving the tree, no device files, no set-uid bits);
2. at the image's own ``HEAD`` the tree is kept as the image has it, untracked and ignored
   files included (SWE-bench images hold build outputs such as compiled extensions there);
   at another commit it is a clean checkout of that commit (an image holding several
   tasks' commits, as ``prepare_data.py --images`` builds for smith packages);
3. either way the history is replaced by one commit of exactly those files
   (``core.gitrepo.snapshot_history``): later commits holding the fix, branches, tags and
   the reflog of the image's repository are not in the copy.

Patches are then diffs against that snapshot commit (``HEAD`` in the copy), identical for
the rollout and for the grade.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from core.gitrepo import GitError, checkout_copy, git, snapshot_history
from core.trees import PreparedTrees

# Limit for streaming one image's work tree out of the engine, seconds.
EXTRACT_TIMEOUT_S = 600.0


class ImageTreeError(RuntimeError):
    """The image has no usable work tree (missing directory, no git repository, unknown commit)."""


class _Stream(io.RawIOBase):
    """A file object over the docker SDK's chunk iterator (tarfile reads it as a stream)."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def extract_workdir(client: Any, image: str, workdir: str, dest: Path) -> None:
    """Copy ``image``'s ``workdir`` to ``dest`` (must not exist). Blocking.

    Raises:
        ImageTreeError: the image has no such directory.
        docker.errors.ImageNotFound: no such image on the engine.
    """
    import docker

    container = client.containers.create(image, command=["true"], network_disabled=True,
                                         labels={"swe-rl.tree-export": "1"})
    try:
        try:
            chunks, _ = container.get_archive(workdir)
        except docker.errors.NotFound as exc:
            raise ImageTreeError(f"image {image} has no {workdir}") from exc
        staging = Path(tempfile.mkdtemp(prefix="image-tree-", dir=dest.parent))
        try:
            with tarfile.open(fileobj=io.BufferedReader(_Stream(chunks), 1 << 20), mode="r|") as tar:
                tar.extractall(staging, filter="data")
            # The archive's top entry is the directory itself (``testbed/``).
            inner = staging / os.path.basename(workdir.rstrip("/"))
            if not inner.is_dir():
                raise ImageTreeError(f"image {image}: {workdir} is not a directory")
            inner.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - the created container is gone already or the engine went away
            pass


async def image_head(tree: Path) -> str:
    """The commit id checked out in an extracted tree (its own, image-made ``.git``).

    Raises:
        ImageTreeError: the tree is no git work tree.
    """
    try:
        return (await git(tree, "-c", "core.fsmonitor=false", "rev-parse", "HEAD")).strip()
    except GitError as exc:
        raise ImageTreeError(f"{tree} holds no git repository: {exc}") from exc


class ImageTrees(PreparedTrees):
    """Host copies of image work trees at a commit (see the module docstring).

    Args:
        client: a ``docker.DockerClient``.
        work_root: parent of the store (None = the system temp dir).
    """

    def __init__(self, client: Any, work_root: str | None = None, max_trees: int = 64) -> None:
        super().__init__(work_root=work_root, max_trees=max_trees, prefix="image-trees-")
        self.client = client

    async def copy_to(self, image: str, workdir: str, commit: str, dest: Path) -> Path:  # type: ignore[override]
        """Make ``dest`` a one-commit copy of ``image``'s ``workdir`` at ``commit`` (see module docstring).

        Raises:
            ImageTreeError: no such directory or repository in the image, or no such commit.
            docker.errors.DockerException: the engine refused (e.g. no such image).
            GitError, TreeCopyError: git or the copy failed.
        """
        image_id = await asyncio.to_thread(lambda: self.client.images.get(image).id)

        async def build(final: Path) -> None:
            raw = final.parent / "image"
            await asyncio.wait_for(asyncio.to_thread(extract_workdir, self.client, image, workdir, raw),
                                   EXTRACT_TIMEOUT_S)
            head = await image_head(raw)
            if commit in ("HEAD", head) or head.startswith(commit):
                await asyncio.to_thread(raw.rename, final)
            else:
                try:
                    await checkout_copy(raw, commit, final)
                except GitError as exc:
                    raise ImageTreeError(f"image {image}: commit {commit} not in {workdir}: {exc}") from exc
                finally:
                    await asyncio.to_thread(shutil.rmtree, raw, True)
            await snapshot_history(final)

        return await super().copy_to((image_id, workdir, commit), build, dest)
