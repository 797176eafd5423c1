"""Smoke runs of the benchmark scripts on the tiny random model: they run end to end and report every row."""

import torch

from eval import bench_kvcache, bench_spec


def test_bench_kvcache_reports_one_row_per_setting():
    # 0.15 is not among the stored budgets: the bench calibrates it as well
    result = bench_kvcache.main(["--plan", "tiny:600", "--steps", "4", "--questions", "1", "--needle-depths",
                                 "--budgets", "0.1", "0.15", "--dense-layers", "1", "0", "--rest", "estimate"])
    rows = result["rows"]
    assert [(r["budget"], r["dense_layers"]) for r in rows] == [(0.1, 1), (0.1, 0), (0.15, 1), (0.15, 0)]
    assert {r["rest"] for r in rows} == {"estimate"}
    for row in rows:
        assert row["context"] == 600 and 0 < row["kv_read_fraction"] <= 1 and 0 <= row["top1_agreement"] <= 1
        assert row["prefill_s"] > 0 and row["dense_step_ms"] > 0 and row["squeezed_step_ms"] > 0
        assert row["steps_compared"] == 8 and len(row["top1_agreement_by_probe"]) == 2  # the document's end, 1 question
        assert row["top1_agreement_strict"] <= row["top1_agreement"] and 0 <= row["dense_ties"] <= 8
        margins = row["miss_dense_margins"]  # one per step where the argmax tokens differ
        assert len(margins) == round(8 * (1 - row["top1_agreement_strict"])) and all(m >= 0 for m in margins)
        regrets = row["miss_dense_regrets"]  # the dense top logit minus the dense logit of squeezed's choice
        assert len(regrets) == len(margins) and all(r >= m for r, m in zip(regrets, margins, strict=True))
        for floor in ("sdpa", "fp32"):  # two exact dense runs of the tiny model: they agree on nearly every step
            assert 0.5 <= row[f"floor_{floor}_top1_agreement_strict"] <= row[f"floor_{floor}_top1_agreement"] <= 1


def test_agreement_counts_a_dense_tie_either_way():
    agreement = bench_kvcache.Agreement()
    dense = torch.tensor([1.0, 3.0, 3.0, 0.0])  # tokens 1 and 2 tie; argmax says 1
    agreement.add(dense, torch.tensor([1.0, 2.9, 3.0, 0.0]))  # picks 2: agrees, but not strictly
    agreement.add(dense, torch.tensor([1.0, 3.0, 2.0, 0.0]))  # picks 1: agrees strictly
    agreement.add(dense, torch.tensor([1.0, 2.0, 2.0, 2.5]))  # picks 3: a miss
    # the other run ties 0 and 1 and its argmax says 0, but 1 is top-1 in both: agrees, not strictly
    agreement.add(torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 0.0, 0.0]))
    report = agreement.report()
    assert agreement.dense_ties == 3
    assert report["top1_agreement"] == 3 / 4 and report["top1_agreement_strict"] == 1 / 4
    assert report["miss_dense_margins"] == [0.0, 0.0, 1.0] and report["miss_dense_regrets"] == [0.0, 1.0, 3.0]
    assert report["max_logit_diff"] == 2.5


def test_bench_kvcache_refined_rows_skip_keep_fractions_above_the_budget():
    result = bench_kvcache.main(["--plan", "tiny:600", "--steps", "4", "--needle-depths", "--budgets", "0.05", "0.2",
                                 "--dense-layers", "0", "--rest", "ignore", "estimate", "calibrated",
                                 "--recent-tokens", "0", "--keep-fractions", "none", "0.1"])
    settings = [(r["budget"], r["rest"], r["keep_fraction"]) for r in result["rows"]]
    assert settings == [(0.05, "ignore", None), (0.05, "estimate", None), (0.05, "calibrated", None),
                        (0.2, "ignore", None), (0.2, "ignore", 0.1), (0.2, "estimate", None), (0.2, "estimate", 0.1),
                        (0.2, "calibrated", None), (0.2, "calibrated", 0.1)]
    refined = result["rows"][4]
    assert refined["kv_read_fraction"] < result["rows"][3]["kv_read_fraction"]  # V of the kept keys only
    estimated = {r["rest"]: r["rest_estimated_layers"] for r in result["rows"] if r["budget"] == 0.2}
    assert estimated["ignore"] == 0 and estimated["estimate"] == 3 and 0 <= estimated["calibrated"] <= 3


def test_bench_spec_checks_every_method_against_ar():
    methods = ["spec-retrieval", "spec-self", "spec-self-prefill", "spec-layer-skip+retrieval"]
    result = bench_spec.main(["--model", "tiny", "--contexts", "600", "--questions", "1", "--new-tokens", "6",
                              "--layer-skip-layers", "1", "--methods", *methods])
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"ar", *methods}
    assert all(row["identical_to_ar"] for row in rows.values())  # fp32 greedy: every method is the target
    assert 0 < rows["spec-self"]["draft_share"] < 1 and 0 < rows["spec-self"]["verify_share"] < 1


def test_bench_spec_names_methods_per_budget_policy():
    result = bench_spec.main(["--model", "tiny", "--contexts", "600", "--questions", "1", "--new-tokens", "4",
                              "--methods", "spec-retrieval", "--budget-policies", "fixed", "cost"])
    assert {row["method"] for row in result["rows"]} == {"ar", "spec-retrieval@fixed", "spec-retrieval@cost"}


def test_bench_spec_repeats_rounds_and_keeps_each_methods_median_one():
    result = bench_spec.main(["--model", "tiny", "--contexts", "600", "--questions", "1", "--new-tokens", "5",
                              "--methods", "spec-retrieval+recycle", "--repeats", "2"])
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"ar", "spec-retrieval+recycle"} and rows["spec-retrieval+recycle"]["identical_to_ar"]
    assert rows["ar"]["new_tokens"] == 5  # one question: its median round, not both rounds
    runs = [bench_spec.Run([1, 2], seconds, 1.0) for seconds in (3.0, 1.0, 2.0)]
    assert bench_spec.median_run(runs, [1, 2]).seconds == 2.0
    runs[0].tokens = [1, 3]
    assert not bench_spec.median_run(runs, [1, 2]).identical  # one round off is enough


def test_bench_tree_times_every_node_count():
    from eval import bench_tree

    result = bench_tree.main(["--model", "tiny", "--context", "300", "--nodes", "1", "4", "--repeats", "2",
                              "--dtype", "bfloat16", "--attention", "model", "sdpa"])
    assert [(row["attention"], row["nodes"]) for row in result["rows"]] == [
        ("model", 1), ("model", 4), ("sdpa", 1), ("sdpa", 4)]
    assert all(ms > 0 for ms in result["decode_ms"].values()) and all(row["ms"] > 0 for row in result["rows"])


def test_bench_kvcache_reuses_a_stored_document(tmp_path):
    argv = ["--plan", "tiny:600", "--steps", "4", "--questions", "0", "--needle-depths", "--no-floors",
            "--dense-layers", "0", "--rest", "ignore", "--document-cache", str(tmp_path)]
    first, second = bench_kvcache.main(argv)["rows"][0], bench_kvcache.main(argv)["rows"][0]
    assert (first["document_cache"], second["document_cache"]) == ("built", "reused")
    assert second["prefill_s"] == first["prefill_s"]  # the times measured when it was built
    same = ("top1_agreement_strict", "max_logit_diff", "kv_read_fraction")
    assert [second[k] for k in same] == [first[k] for k in same]
    assert not list(tmp_path.glob("*.prefill/*"))  # the prefill slices are dropped once the cache is stored
    stored = next(p for p in tmp_path.glob("*.safetensors") if not p.name.endswith(".logits.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-64])  # damaged: refused, rebuilt
    assert bench_kvcache.main(argv)["rows"][0]["document_cache"] == "built"


def test_bench_spec_replay_matches_the_engine_at_a_fixed_budget():
    """Replaying the retrieval drafter on the AR answer accepts what the engine accepted with the same budget
    (the tiny model's greedy answers repeat themselves, so some drafts are accepted)."""
    result = bench_spec.main(["--model", "tiny", "--contexts", "600", "--questions", "2", "--new-tokens", "48",
                              "--methods", "spec-retrieval", "--budget-policies", "fixed", "--tree-budget", "4",
                              "--replay-budgets", "1", "4"])
    rows = {(row["method"], row.get("tree_budget")): row for row in result["rows"]}
    engine = rows[("spec-retrieval", None)]["mean_acceptance_length"]
    replayed = rows[("replay-retrieval", 4)]
    assert engine > 1 and replayed["mean_acceptance_length"] == engine
    assert 1 < replayed["tokens_per_forward"] <= engine  # steps with an empty tree count as forwards too
    assert rows[("replay-retrieval", 1)]["mean_acceptance_length"] <= engine
