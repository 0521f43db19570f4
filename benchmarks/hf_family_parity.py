"""Parity figures per family against transformers (issue 19): the numbers behind tests/model/test_hf_parity.py.

For each case of that test (the same tiny random models, built by transformers, perturbed, saved with
HF's save_pretrained, loaded with ours), in float32: the largest logit error relative to the largest
|logit|, whether every router chose the same experts, the loss difference, and the largest relative
error over every parameter's gradient (max |g_ours - g_hf| / max |g_hf|, the worst parameter).

    python benchmarks/hf_family_parity.py
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3_lightning import DeepSeekV3

_TEST = Path(__file__).resolve().parents[1] / "tests" / "model" / "test_hf_parity.py"


def load_test_module():
    spec = importlib.util.spec_from_file_location("test_hf_parity", _TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    t = load_test_module()
    print(f"{'case':<32} {'model_type':<14} {'logits rel':>10} {'routing':>8} {'|dloss|':>9} {'grad rel':>9}")
    for name in sorted(t.CASES):
        kind, overrides = t.CASES[name]
        hf_model = t.build_hf_model(kind, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            if kind == "kimi_k2":  # as the test's fixture: Kimi-K2's own model_type
                config = json.loads((Path(tmp) / "config.json").read_text())
                (Path(tmp) / "config.json").write_text(t.dump_like_hf({**config, "model_type": "kimi_k2"}))
            ours = DeepSeekV3.from_pretrained(tmp)
        torch.manual_seed(1)
        ids = torch.randint(0, t.BASE["vocab_size"], (2, 24))
        hf_routes = t.record_routing(hf_model, kind)
        hf_out = hf_model(input_ids=ids, labels=ids)
        out = ours(ids)
        same = all(
            torch.equal(a.sort(-1).values, b.sort(-1).values)
            for a, b in zip([r.last_stats.topk_ids_TK for r in ours.routers()], hf_routes)
        )
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        hf_out.loss.backward()
        hf_grads = {n: p.grad for n, p in t.text_parameters(kind, hf_model).items()}
        grad = max(t.relative_error(p.grad, hf_grads[t.hf_name(kind, n)]) for n, p in ours.named_parameters())
        family = ours.hf_origin.model_type + ("*" if kind == "kimi_k2" else "")
        print(f"{name:<32} {family:<14} {t.relative_error(out.logits, hf_out.logits):>10.1e} "
              f"{'same' if same else 'DIFFER':>8} {abs(loss - hf_out.loss).item():>9.1e} {grad:>9.1e}")
    print("* kimi_k2: the reference is transformers' DeepseekV3ForCausalLM; its config.json says kimi_k2 for ours")


if __name__ == "__main__":
    main()
