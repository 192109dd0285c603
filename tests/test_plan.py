"""The ownership plan: deterministic, balanced, and each factor where its locality rule allows."""

from __future__ import annotations

import pytest

from soap_dist.bench.param_sets import gpt2_specs, spec_layouts
from soap_dist.plan import Topology, build_plan, rows_of, shard_rows


def gpt2_small_layouts(block_size=None):
    return spec_layouts(gpt2_specs("gpt2-small"), block_size)


@pytest.mark.parametrize(
    "topology",
    [Topology("replicated", 4, 1, 0), Topology("fsdp-local", 1, 4, 0), Topology("hsdp", 2, 2, 0)],
    ids=lambda t: t.placement,
)
def test_plan_balance_gpt2_small_world_4(topology):
    plan = build_plan(gpt2_small_layouts(), topology)
    cost = plan.owned_cost()
    assert max(cost) / (sum(cost) / len(cost)) <= 1.25
    owned = plan.owned_bytes()
    largest = max(e.size * e.size * 4 for e in plan.entries)
    assert max(owned) - sum(owned) / len(owned) <= largest


def test_plan_is_a_function_of_shapes_only():
    a = build_plan(gpt2_small_layouts(), Topology("replicated", 4, 1, 0))
    b = build_plan(gpt2_small_layouts(), Topology("replicated", 4, 1, 3))
    assert a.entries == b.entries
    assert a.param_hashes(gpt2_small_layouts()) == b.param_hashes(gpt2_small_layouts())


def test_locality_rules():
    plan = build_plan(gpt2_small_layouts(), Topology("hsdp", 2, 2, 0))
    for e in plan.entries:
        if not e.shared:  # a row factor is owned by a replica of its own shard
            assert e.owner % 2 == e.shard
    fsdp = build_plan(gpt2_small_layouts(), Topology("fsdp-local", 1, 4, 0))
    assert all(e.owner == e.shard for e in fsdp.entries if not e.shared)
    # the 50304-row embedding has no row factor at any world size (decided on the full dim)
    assert not [e for e in fsdp.entries if e.param == 0 and not e.shared]


@pytest.mark.parametrize("rows,shards", [(17, 2), (17, 4), (3, 4), (0, 2), (8, 4)])
def test_shard_rows_follows_torch_chunk(rows, shards):
    import torch

    chunks = [c.shape[0] for c in torch.empty(rows, 1).chunk(shards)] if rows else []
    chunks += [0] * (shards - len(chunks))
    assert [shard_rows(rows, shards, s)[1] for s in range(shards)] == chunks
    starts = [shard_rows(rows, shards, s)[0] for s in range(shards)]
    assert starts == [min(sum(chunks[:s]), rows) for s in range(shards)]


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_owner_step_traffic_is_gradients_in_and_updates_out(shards):
    """Every row held away from its owner crosses twice a step: its gradient in, its update out."""
    from soap_dist.owner_layout import assign_owners, crossing_elements, step_traffic

    layouts = gpt2_small_layouts()
    owners = assign_owners(layouts, shards, 4, [4] * len(layouts))
    grads, updates = [2] * len(layouts), [4] * len(layouts)  # bf16 gradients, float32 updates
    per_shard = [step_traffic(layouts, owners, shards, s, grads, updates) for s in range(shards)]
    crossing = crossing_elements(layouts, owners, shards, [True] * len(layouts))
    assert sum(sent for sent, _ in per_shard) == sum(received for _, received in per_shard)
    assert sum(sent for sent, _ in per_shard) == crossing * (2 + 4)


@pytest.mark.parametrize(("replicas", "shards"), [(2, 4), (4, 2), (8, 8)])
def test_owner_over_an_hsdp_mesh_moves_each_row_update_to_every_rank_holding_it(replicas, shards):
    """Owners over every rank of an R x S mesh: gradients cross inside the owner's shard group only,
    and every rank receives the update of each row it holds but did not step itself."""
    from soap_dist.bench.scaling_worker import scaled_specs
    from soap_dist.owner_layout import SPREAD, crossing_elements, held_rows, owner_placement, step_traffic

    layouts = spec_layouts(scaled_specs("gpt2-small", 1, None, None))  # wte spread from 4 ranks on
    n, W = len(layouts), replicas * shards
    owners, splits = owner_placement(layouts, shards, 4, [4] * n, replicas=replicas)
    assert max(owners) >= shards and SPREAD in owners  # owners beyond one shard group; wte spread
    grads = [step_traffic(layouts, owners, shards, r, [1] * n, [0] * n, replicas) for r in range(W)]
    updates = [step_traffic(layouts, owners, shards, r, [0] * n, [1] * n, replicas) for r in range(W)]
    crossing = crossing_elements(layouts, owners, shards, [True] * n)
    assert sum(s for s, _ in grads) == sum(r for _, r in grads) == crossing
    held = replicas * sum(
        rows_of(lay) * lay.row_elements for lay in layouts
    )  # every rank holds its shard's rows
    stepped_where_held = 0  # rows a rank steps itself among those it holds
    for k, lay in enumerate(layouts):
        if owners[k] == SPREAD:
            stepped_where_held += (
                rows_of(lay) * lay.row_elements
            )  # each rank steps a part of its own shard's rows
        else:
            stepped_where_held += held_rows(lay, shards, owners[k] % shards)[1] * lay.row_elements
    assert sum(r for _, r in updates) == sum(s for s, _ in updates) == held - stepped_where_held
    # the spread rows' parts: every rank steps a piece, together each row exactly once
    (wte,) = [k for k, o in enumerate(owners) if o == SPREAD]
    assert sum(c for _, c in splits[layouts[wte].index]) == layouts[wte].shape[0]


def test_owners_over_an_hsdp_mesh_give_every_replica_a_like_share_of_rows():
    """Each replica sends its owned rows' updates to the others, so LPT's ties go round the replicas:
    llama-8b has fewer parameters than the 512 ranks of 64 x 8, and filling ranks in order put
    whole matrices in the first replicas only (the largest replica held 4.3x the mean)."""
    from soap_dist.owner_layout import SPREAD, owner_placement
    from soap_dist.plan.__main__ import layouts_of

    layouts = layouts_of("llama-8b", None, 10000)
    for replicas, tolerance in ((64, 1.3), (8, 1.01)):
        owners, _ = owner_placement(layouts, 8, 4, [4] * len(layouts), replicas=replicas)
        rows = [0] * replicas
        for k, lay in enumerate(layouts):
            if owners[k] != SPREAD:
                rows[owners[k] // 8] += rows_of(lay) * lay.row_elements
        assert max(rows) <= tolerance * sum(rows) / replicas, (replicas, max(rows), sum(rows) / replicas)


def test_owner_spreads_only_row_free_parameters_and_only_where_the_largest_rank_gains():
    """An embedding too large for one owner is left spread; at W = 2 LPT's real outcome would be no
    better, so nothing is; a parameter with a row factor is never spread."""
    from soap_dist.bench.scaling_worker import scaled_specs
    from soap_dist.owner_layout import SPREAD, largest_state, owner_placement, spread_params, spreadable

    layouts = spec_layouts(scaled_specs("gpt2-small", 1, None, None))  # one layer, d = 768, vocab 50304
    four = [4] * len(layouts)
    names = {lay.index: lay.name for lay in layouts}
    assert spread_params(layouts, 2, 4, four) == frozenset()
    for shards in (4, 8, 64):
        spread = spread_params(layouts, shards, 4, four)
        assert [names[i] for i in spread] == ["wte.weight"]
        assert all(spreadable(layouts[i]) for i in spread)
        assert largest_state(layouts, shards, 4, four, spread) < largest_state(layouts, shards, 4, four)
        owners, splits = owner_placement(layouts, shards, 4, four)
        (wte,) = spread
        assert owners[wte] == SPREAD and [n for _, n in splits[wte]] == [
            -(-50304 // shards) if s < shards - 1 else 50304 - (shards - 1) * -(-50304 // shards)
            for s in range(shards)
        ]


def test_owner_spreads_an_untied_embedding_and_head_together():
    """llama-70b at W = 512: the embedding and the head (128256 x 8192, equal sizes) only lower the
    largest rank's state together; the MLP matrices, also without row factors, stay owned."""
    from soap_dist.owner_layout import largest_state, spread_params
    from soap_dist.plan.__main__ import layouts_of

    layouts = layouts_of("llama-70b", None, 10000)
    four = [4] * len(layouts)
    spread = spread_params(layouts, 512, 4, four)
    assert sorted(layouts[i].shape for i in spread) == [(128256, 8192), (128256, 8192)]
    before, after = largest_state(layouts, 512, 4, four), largest_state(layouts, 512, 4, four, spread)
    assert after < 0.5 * before, (before, after)


def test_plan_command_names_what_owner_leaves_spread(capsys):
    from soap_dist.plan.__main__ import main

    assert main(["--model", "llama-8b", "--world", "64", "--shard", "8"]) == 0
    out = capsys.readouterr().out
    spread = "leaves spread (docs/design.md, section 9): embed_tokens.weight, lm_head.weight"
    assert f"owner over 1 x 64 ranks {spread}" in out
    assert f"owner over 8 x 8 ranks {spread}" in out  # owners over the whole HSDP mesh
    rows = {line.split()[0] + " " + " ".join(line.split()[1:4]): line for line in out.splitlines()}
    world, group = rows["owner 8 x 8"].split(), rows["owner(sg) 8 x 8"].split()
    assert float(world[7]) < float(group[7]) / 5  # the state: 1/W against 1/S


@pytest.mark.parametrize(
    "block_size, world, exact",
    [(None, 1, True), (None, 2, False), (3, 2, True), (4, 2, False), (64, 4, True), (128, 4, False)],
)
def test_fsdp_local_is_exact_only_where_its_row_blocks_are_one_process_s(block_size, world, exact):
    """auto picks fsdp-local only then: its trajectory would otherwise depend on W (the audit's case)."""
    from soap_dist.layout import plan_in_group
    from soap_dist.plan.costs import prefers_owner, row_blocks_as_one_process

    group = dict(max_precond_dim=1000, merge_dims=False, precondition_1d=False, block_size=block_size)
    rows = 17 if world == 2 else 768  # 17 rows at W = 2: shards of 9 and 8, one process's blocks of 3 fit
    layouts = [plan_in_group(0, 0, "w", (rows, 3), {**group, "data_format": "channels_first"})]
    for topology in (Topology("fsdp-local", 1, world, 0), Topology("hsdp", 2, world, 0)):
        plan = build_plan(layouts, topology)
        assert row_blocks_as_one_process(plan) is exact
        if not exact:
            assert prefers_owner(plan, 4, [4])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-k", "0"], "--precondition-frequency/-k must be >= 1 (refresh every k steps), got 0"),
        (["-k", "-2"], "--precondition-frequency/-k must be >= 1 (refresh every k steps), got -2"),
        (["--max-precond-dim", "-1"], "--max-precond-dim must be >= 1, got -1"),
    ],
)
def test_plan_command_refuses_bad_flags_naming_them(flags, message, capsys):
    """-k 0 was a ZeroDivisionError, -k -2 printed negative traffic, --max-precond-dim -1 passed."""
    from soap_dist.plan.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", "gpt2-small", "--world", "2", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    from soap_dist.plan.costs import RankCosts

    with pytest.raises(ValueError, match="k .the precondition frequency. must be >= 1, got 0"):
        RankCosts().per_step(0)


def test_plan_command_says_why_a_large_world_is_quiet(capsys, monkeypatch):
    import soap_dist.plan.__main__ as plan

    monkeypatch.setattr(plan, "LARGE_WORK", 148 * 4)  # gpt2-small has 148 tensors
    assert plan.main(["--model", "gpt2-small", "--world", "4"]) == 0
    captured = capsys.readouterr()
    assert "soap_dist.plan: costing 148 tensors over 4 ranks for every placement" in captured.err
    assert "costing" not in captured.out
    assert plan.main(["--model", "gpt2-small", "--world", "2"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("basis_dtype", [None, "bfloat16"])
def test_the_planned_stash_is_what_a_delayed_run_keeps(basis_dtype, capsys):
    """rank_costs(delayed=True) counts refresh_delay's stash as stats() does (block rows included),
    and python -m soap_dist.plan --refresh-delay prints it."""
    import torch

    from soap_dist import SOAP
    from soap_dist.plan import SINGLE
    from soap_dist.plan.__main__ import main
    from soap_dist.plan.costs import rank_costs

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(12, 5), (7, 9), (6,)]]
    dtype = getattr(torch, basis_dtype) if basis_dtype else None
    opt = SOAP(params, precondition_frequency=2, refresh_delay=1, block_size=4, basis_dtype=dtype)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    layouts = opt._layouts()
    n = len(layouts)
    basis_bytes = 2 if basis_dtype else None
    plan = build_plan(layouts, SINGLE)
    planned = rank_costs(plan, 4, [4] * n, [4] * n, basis_bytes=basis_bytes, delayed=True)
    assert planned[0].stash == opt.stats()["stash_bytes"] > 0
    assert main(["--model", "gpt2-small", "--world", "2", "--refresh-delay", "1"]) == 0
    assert "stash" in capsys.readouterr().out.splitlines()[1]


def test_plan_piped_into_head_ends_without_a_traceback():
    import os
    import subprocess
    import sys

    command = f"{sys.executable} -m soap_dist.plan --model llama-8b --world 64 --refresh-delay 1 | head -1"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line written at once: head is gone for the next
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.stdout.startswith("llama-8b: 291 tensors") and proc.stdout.count("\n") == 1
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
