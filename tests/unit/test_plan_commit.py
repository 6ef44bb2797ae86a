"""The commit plan is pure data: per disk, the ``block-commit`` job (its id, top and base
nodes), the pivot's commands and the overlay's removal, read for records enable writes on each
recorded QEMU build (7.2 and 10.0), checked against that build's QMP schema."""

from __future__ import annotations

import attrs
import pytest
from forged import TAG, VERSIONS, accepted, forge, legacy_drive, on_overlays, query_block

from forgeqmp.core import names
from forgeqmp.core.plans.command import Command
from forgeqmp.core.plans.commit import (
    DiskCommit,
    attached_nodes,
    disk_commit,
    is_commit_job,
    plan_commit,
    remove_overlay_nodes,
)
from forgeqmp.core.plans.common import CONT, QUERY_BLOCK, QUERY_JOBS, STOP


@pytest.mark.parametrize("version", VERSIONS)
def test_every_disk_on_its_overlay_gets_one_commit_job_into_its_original(version: str) -> None:
    _, record = forge(version)
    plan = plan_commit(record, on_overlays(record, query_block(version)))
    assert [d.disk for d in plan.disks] == ["d0", "d1"]  # the read-only disk and CD-ROM: never
    assert plan.starts() == (
        Command(
            "block-commit",
            {
                "job-id": f"{TAG}-0-commit",
                "device": f"{TAG}-0-fmt",
                "base-node": "d0-fmt",
                "auto-dismiss": False,
            },
        ),
        Command(
            "block-commit",
            {
                "job-id": f"{TAG}-1-commit",
                "device": f"{TAG}-1-fmt",
                "base-node": "d1-fmt",
                "auto-dismiss": False,
            },
        ),
    )
    assert all(accepted(version, c) for c in plan.starts())


@pytest.mark.parametrize("version", VERSIONS)
def test_the_pivot_completes_and_dismisses_the_disks_own_job(version: str) -> None:
    _, record = forge(version)
    d1 = disk_commit(record.disk("d1"))
    assert d1.complete() == Command("job-complete", {"id": f"{TAG}-1-commit"})
    assert d1.dismiss() == Command("job-dismiss", {"id": f"{TAG}-1-commit"})
    assert d1.cancel() == Command("job-cancel", {"id": f"{TAG}-1-commit"})
    # The guest is paused around the pivot by the plain run-state commands.
    for command in (STOP, d1.complete(), d1.dismiss(), d1.cancel(), CONT, QUERY_JOBS):
        assert accepted(version, command), command


@pytest.mark.parametrize("version", VERSIONS)
def test_the_overlay_is_removed_format_node_first_then_its_file_node(version: str) -> None:
    _, record = forge(version)
    removal = remove_overlay_nodes(record.disk("d0"))
    assert removal == (
        Command("blockdev-del", {"node-name": f"{TAG}-0-fmt"}),
        Command("blockdev-del", {"node-name": f"{TAG}-0-file"}),
    )
    assert all(accepted(version, c) for c in removal)
    # Only the nodes still recorded: a node removed before (the record drops it) is not asked.
    only_file = attrs.evolve(record.disk("d0"), overlay_node=None)
    assert remove_overlay_nodes(only_file) == (
        Command("blockdev-del", {"node-name": f"{TAG}-0-file"}),
    )
    gone = attrs.evolve(only_file, overlay_file_node=None)
    assert remove_overlay_nodes(gone) == ()


@pytest.mark.parametrize("version", VERSIONS)
def test_a_disk_already_back_on_its_original_has_nothing_left_to_merge(version: str) -> None:
    _, record = forge(version)
    blocks = on_overlays(record, query_block(version))
    for b in blocks:  # d0's commit finished before the interruption: QEMU shows the original
        if b.get("qdev") == record.disk("d0").qdev:
            b["inserted"] = {**b["inserted"], "node-name": "d0-fmt"}
    plan = plan_commit(record, blocks)
    assert [d.disk for d in plan.disks] == ["d1"]
    # ...and a device QEMU no longer shows is not committed either.
    without_d1 = [b for b in blocks if b.get("qdev") != record.disk("d1").qdev]
    assert plan_commit(record, without_d1).disks == ()


def test_a_drive_disk_commits_into_the_node_qemu_named() -> None:
    qdev = "/machine/peripheral/virtio0/virtio-backend"
    blocks = [*query_block("10.0"), legacy_drive(qdev, "#block146", "/v/legacy.raw")]
    _, record = forge("10.0", blocks=blocks)
    assert [d.name for d in record.disks] == ["d0", "d1", "virtio0"]
    plan = plan_commit(record, on_overlays(record, blocks))
    legacy = plan.disks[2]
    assert legacy == DiskCommit(
        disk="virtio0",
        qdev=qdev,
        top_node=f"{TAG}-2-fmt",
        base_node="#block146",
        job_id=f"{TAG}-2-commit",
    )
    assert legacy.start().arguments["base-node"] == "#block146"
    assert accepted("10.0", legacy.start())


def test_job_ids_and_which_jobs_are_commit_jobs_of_ours() -> None:
    assert names.commit_job(f"{TAG}-3-fmt") == f"{TAG}-3-commit"
    assert is_commit_job({"id": f"{TAG}-3-commit", "type": "commit", "status": "ready"})
    assert not is_commit_job({"id": f"{TAG}-3-create-undo", "type": "commit"})  # an undo's
    assert not is_commit_job({"id": f"{TAG}-3-create", "type": "create"})
    assert not is_commit_job({"id": "backup-commit", "type": "backup"})
    assert not is_commit_job({"type": "commit"})


def test_a_disk_without_an_overlay_cannot_be_planned() -> None:
    _, record = forge("10.0")
    with pytest.raises(ValueError, match="no overlay"):
        disk_commit(attrs.evolve(record.disk("d0"), overlay_node=None))


def test_attached_nodes_map_each_device_to_its_node_and_skip_empty_drives() -> None:
    assert attached_nodes(query_block("7.2")) == {
        "/machine/peripheral/d0/virtio-backend": "d0-fmt",
        "/machine/peripheral/d1/virtio-backend": "d1-fmt",
        "/machine/peripheral/ro/virtio-backend": "ro-fmt",
    }
    assert Command("query-block") == QUERY_BLOCK
