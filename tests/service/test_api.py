"""The plan service on a real uvicorn server (`bitalloc serve`, embedded SQLite store and worker), on loopback."""
import json
import os
import stat
import threading

import pytest

from .conftest import SMALL


def test_a_served_plan_is_the_plan_allocate_writes(server, small_plan, tmp_path, capsys):
    from bitalloc.cli import main
    _, done, plan_id, served = small_plan
    out = tmp_path / "local.json"
    assert main(["allocate", "--budget", "3.2", "--n-windows", "4", "--seq-len", "64", "--out", str(out)]) == 0
    assert served == out.read_bytes(), "the service's plan differs from `bitalloc allocate`'s"
    status, _, again = server.call("GET", f"/v1/plans/{plan_id}")
    assert status == 200 and again == served
    via = tmp_path / "via.json"
    assert main(["allocate", "--server", server.url, "--token", server.token, "--budget", "3.2", "--n-windows", "4",
                 "--seq-len", "64", "--out", str(via)]) == 0
    assert via.read_bytes() == served


def test_the_python_client_returns_the_same_bitplan(server, small_plan):
    import bitalloc
    plan = bitalloc.Client(server.url, server.token).allocate("refllama-s", budget_bits=3.2, **SMALL)
    assert isinstance(plan, bitalloc.BitPlan)
    assert plan.dumps().encode() == small_plan[3]


def test_concurrent_identical_requests_share_one_job(server):
    body = {"model": "refllama-s", "budget_bits": 3.0, "n_windows": 3, "seq_len": 64}
    answers = []

    def ask():
        answers.append(server.json("POST", "/v1/plans", body))
    threads = [threading.Thread(target=ask) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ids = {job["id"] for status, job in answers if status == 202}
    assert len(ids) == 1 and all(status == 202 for status, _ in answers), answers
    job = server.wait_job(ids.pop())
    assert job["state"] == "done" and job["attempts"] == 1
    _, jobs = server.json("GET", "/v1/jobs")
    assert sum(j["table_id"] == job["table_id"] for j in jobs) == 1


def test_row_plans_exports_pareto_and_charts(server, small_plan):
    # a row plan is made on the model, as `bitalloc allocate` makes it (checked against the layer plan): a job
    status, headers, raw = server.call("POST", "/v1/plans?wait=300", {"model": "refllama-s", "budget_bits": 3.25,
                                                                      "granularity": "row", **SMALL})
    assert status == 200, raw
    plan = json.loads(raw)
    assert plan["version"] == 2 and any("row_bits" in v for v in plan["layers"].values())
    assert plan["extra"]["row_check"]["row_kl"] <= plan["extra"]["row_check"]["layer_kl"]
    pid = headers["x-bitalloc-plan-id"]
    status, headers, text = server.call("GET", f"/v1/plans/{pid}/export/llama.cpp")
    assert status == 200 and b"blk\\." in text and "x-bitalloc-warning" in headers     # rows rounded up, said so
    status, _, text = server.call("GET", f"/v1/plans/{small_plan[2]}/export/gptqmodel")
    assert status == 200 and json.loads(text)["quant_method"] == "gptq"
    status, curve = server.json("GET", "/v1/models/refllama-s/pareto")
    assert status == 200
    bpw = [p["true_bpw"] for p in curve["points"]]
    cost = [p["objective"] for p in curve["points"]]
    assert bpw == sorted(bpw) and cost == sorted(cost, reverse=True) and len(curve["llama.cpp"]) == 4
    for path in ("/v1/models/refllama-s/pareto?format=png", f"/v1/plans/{pid}/heatmap.png"):
        status, headers, png = server.call("GET", path)
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n" and headers["content-type"] == "image/png"


def test_register_a_model_under_the_root(server, models_root):
    status, model = server.json("POST", "/v1/models", {"path": "tiny"})
    assert status in (200, 201) and model["id"] == "tiny" and model["n_units"] == 14
    status, again = server.json("POST", "/v1/models", {"path": str(models_root / "tiny")})   # absolute, inside
    assert status == 200 and again["hash"] == model["hash"]


def test_the_token_file_is_private_and_writes_need_it(server):
    assert stat.S_IMODE(os.stat(server.home / "token").st_mode) == 0o600
    for token in (None, "wrong"):
        status, body = server.json("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2}, token=token)
        assert status == 401 and "Authorization: Bearer" in body["error"]
    assert server.json("GET", "/v1/models", token=None)[0] == 200          # reads are open


def test_a_new_token_never_reads_as_a_flag(tmp_path, monkeypatch):
    """secrets.token_urlsafe may start with "-", which `allocate --token T` would take for a flag (1 start in 64
    failed CI that way)."""
    import secrets

    from bitalloc.cli.parser import build_parser
    from bitalloc.service.security import load_or_create_token
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "-x" + "a" * 40)
    token = load_or_create_token(tmp_path)
    assert not token.startswith("-")
    args = build_parser().parse_args(["allocate", "--server", "http://127.0.0.1:1", "--token", token, "--budget", "3"])
    assert args.token == token


def _line(body) -> str:
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


@pytest.mark.parametrize("method,path,body,status,words", [
    ("GET", "/v1/models/nope", None, 404, "no model 'nope'"),
    ("GET", "/v1/plans/plan_nope", None, 404, "no plan 'plan_nope'"),
    ("GET", "/v1/jobs/job_nope", None, 404, "no job 'job_nope'"),
    ("POST", "/v1/plans", {"model": "nope", "budget_bits": 3.2}, 404, "POST /v1/models"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 1.0}, 422, "infeasible"),
    ("POST", "/v1/plans", {"model": "refllama-s"}, 422, "give field 'budget_bits' (bits per weight) or a size"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": "lots"}, 422, "field 'budget_bits'"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, "budjet": 1}, 422, "field 'budjet': is not a field"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, "probe": "magic"}, 422, "unknown probe 'magic'"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, "solver": "magic"}, 422, "unknown solver 'magic'"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, "granularity": "row", "solver": "evolutionary"},
     422, "no row granularity"),
    ("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, "options": "3,5x"}, 422, "field 'options'"),
    ("POST", "/v1/models", {"path": "../etc"}, 403, "contains '..'"),
    ("POST", "/v1/models", {"path": "/etc"}, 403, "outside the server's --models-root"),
    ("POST", "/v1/models", {"path": "missing"}, 400, "does not exist"),
    ("DELETE", "/v1/models", None, 405, "not allowed"),
])
def test_bad_input_is_a_status_and_one_line(server, method, path, body, status, words):
    got, answer = server.json(method, path, body)
    assert got == status and words in _line(answer), answer


def test_a_budget_below_a_stored_tables_cheapest_plan_names_the_minimum(server, small_plan):
    status, body = server.json("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 2.13, **SMALL})
    assert status == 422 and "infeasible" in _line(body) and "budget_bits ≥ 2.14" in _line(body)


def test_malformed_json_and_a_huge_body(server):
    status, _, raw = server.call("POST", "/v1/plans", raw=b'{"model": "refllama-s", ')
    assert status == 422 and "not valid JSON" in _line(json.loads(raw))
    status, _, raw = server.call("POST", "/v1/plans", raw=b'{"model": "' + b"x" * 200_000 + b'"}')
    assert status == 413 and "over 65,536 bytes" in _line(json.loads(raw))


def test_a_symlink_out_of_the_root_is_refused(server, models_root, tiny_llama_dir):
    link = models_root / "escape"
    if not link.exists():
        link.symlink_to(tiny_llama_dir)
    status, body = server.json("POST", "/v1/models", {"path": "escape"})
    assert status == 403 and "outside" in _line(body)


def test_the_same_name_with_other_weights_is_a_conflict(server, models_root):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    changed = models_root / "changed"
    shutil.copytree(models_root / "tiny", changed, dirs_exist_ok=True)
    status, _ = server.json("POST", "/v1/models", {"path": "changed"})
    assert status in (200, 201)
    weights = load_file(changed / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + torch.randn_like(weights[name])
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    status, body = server.json("POST", "/v1/models", {"path": "changed"})
    assert status == 409 and "register it under another name" in _line(body)


def test_a_table_measured_on_another_model_is_a_conflict(server, small_plan):
    """A stored table whose model hash is not the registered model's (an import gone wrong, a copied store)."""
    from bitalloc.service import catalog
    from bitalloc.service.store import JobRow, ModelRow, Store, TableRow, new_id
    store = Store(f"sqlite:///{server.home}/store.db")
    with store.session() as s:
        source = s.get(TableRow, small_plan[1]["table_id"])
        other = ModelRow(id="other", path="@none", architecture="LlamaForCausalLM", hash="not-refllama",
                         n_params=1, units=[])
        s.add(other)
        s.add(TableRow(id="tbl_other", key="other-key", model_id="other", model_hash="not-refllama", probe="fisher",
                       quantizer="rtn", key_inputs={}, sidecar=source.sidecar, data=source.data, seconds=0.0))
        treq = catalog.table_request(other, catalog.config_of({"budget_bits": 3.2}))
        s.add(JobRow(id=new_id("job"), kind="table", request_key=catalog.request_key(treq), request=treq,
                     model_id="other", state="done", attempts=1, progress={}, table_id="tbl_other"))
        s.commit()
    status, body = server.json("POST", "/v1/plans", {"model": "other", "budget_bits": 3.2, "check": False})
    assert status == 409 and "measured on another model" in _line(body)


def test_allocate_server_refuses_what_it_cannot_send(server, capsys):
    from bitalloc.cli import main
    assert main(["allocate", "--server", server.url, "--budget", "3.2", "--eval", __file__]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--eval is not served by --server" in err


def test_a_checked_row_plan_is_made_on_the_model_as_allocate_makes_it(server, small_plan, tmp_path):
    from bitalloc.cli import main
    body = {"model": "refllama-s", "budget_bits": 3.25, "granularity": "row", "check": True, **SMALL}
    status, headers, served = server.call("POST", "/v1/plans?wait=300", body)
    assert status == 200, served
    _, jobs = server.json("GET", "/v1/jobs")
    made = [j for j in jobs if j["plan_id"] == headers["x-bitalloc-plan-id"]]
    assert made and made[0]["kind"] == "plan"                    # made on the model by a worker's job
    # a row plan is always checked: the same request without "check" is the same config, the same job
    status, again, _ = server.call("POST", "/v1/plans", {k: v for k, v in body.items() if k != "check"})
    assert status == 200 and again["x-bitalloc-plan-id"] == headers["x-bitalloc-plan-id"]
    out = tmp_path / "rows.json"
    assert main(["allocate", "--budget", "3.25", "--granularity", "row", "--n-windows", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    assert served == out.read_bytes()
    assert "not run" not in str(json.loads(served)["extra"].get("row_check"))     # the check ran, as locally


def test_a_refined_plan_comes_from_a_job(server, small_plan):
    body = {"model": "refllama-s", "budget_bits": 3.2, "refine": 2, **SMALL}
    status, headers, raw = server.call("POST", "/v1/plans?wait=300", body)
    assert status == 200, raw
    plan = json.loads(raw)
    refine = plan["extra"]["refine"]
    assert refine["kl"] <= refine["seed_kl"] and plan["true_bpw"] <= 3.2


def test_the_evolutionary_solver_runs_on_a_worker(server, small_plan, tmp_path):
    from bitalloc.cli import main
    body = {"model": "refllama-s", "budget_bits": 3.2, "solver": "evolutionary", "generations": 2, "check": False,
            **SMALL}
    status, headers, raw = server.call("POST", "/v1/plans?wait=300", body)
    assert status == 200, raw
    plan = json.loads(raw)
    assert plan["solver"] == "evolutionary" and plan["true_bpw"] <= 3.2
    out = tmp_path / "evo.json"
    assert main(["allocate", "--server", server.url, "--token", server.token, "--budget", "3.2", "--solver",
                 "evolutionary", "--generations", "2", "--no-check", "--n-windows", "4", "--seq-len", "64",
                 "--out", str(out)]) == 0
    assert out.read_bytes() == raw                   # the same request: the plan that job made


def test_apply_is_a_job_that_writes_the_checkpoint_apply_writes(server, small_plan, tmp_path):
    """POST /v1/plans/{id}/checkpoints: `bitalloc apply --format` on a worker; the same request shares the job;
    the file equals the one `bitalloc apply` writes from the same plan; bad formats are 422 in one line."""
    import hashlib
    from pathlib import Path

    from bitalloc.cli import main
    _, _, plan_id, raw = small_plan
    status, job = server.json("POST", f"/v1/plans/{plan_id}/checkpoints", {"format": "gguf"})
    assert status in (200, 202) and job["kind"] == "apply" and job["checkpoint"].endswith(".gguf"), job
    _, again = server.json("POST", f"/v1/plans/{plan_id}/checkpoints", {"format": "gguf"})
    assert again["id"] == job["id"]
    done = server.wait_job(job["id"])
    assert done["state"] == "done" and done["plan_id"] == plan_id, done
    status, ready = server.json("POST", f"/v1/plans/{plan_id}/checkpoints", {"format": "gguf"})
    assert status == 200 and ready["id"] == job["id"]
    written = Path(done["checkpoint"])
    assert written.is_relative_to(server.home) and written.is_file()
    (tmp_path / "plan.json").write_bytes(raw)
    local = tmp_path / "local.gguf"
    assert main(["apply", "--plan", str(tmp_path / "plan.json"), "--format", "gguf", "--n-windows", "4",
                 "--seq-len", "64", "--out", str(local)]) == 0
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (written, local)]
    assert digest[0] == digest[1]
    status, err = server.json("POST", f"/v1/plans/{plan_id}/checkpoints", {"format": "awq"})
    assert status == 422 and "format" in err["error"] and "\n" not in err["error"]
    status, err = server.json("POST", f"/v1/plans/{plan_id}/checkpoints", {"format": "gguf", "quantizer": "awq"})
    assert status == 422 and "quantizer" in err["error"] and "\n" not in err["error"]
    status, err = server.json("POST", "/v1/plans/pln_nope/checkpoints", {"format": "gguf"})
    assert status == 404
