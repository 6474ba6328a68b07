"""output.gguf's converter (kubetune_trainer.gguf_export) on tiny Llama models built
from config with a small byte-level BPE tokenizer trained here: the files read back
with the gguf package and with transformers (which dequantizes them), the logits
agree with the safetensors model's within each type's error, the tokenizer and chat
template survive, and models the export cannot convert are refused by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_fixtures import CHAT, CORPUS, tiny_folder

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")

PROBE = [1, 5, 40, 200, 17, 42, 99, 250, 3, 7]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"), tied=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROBE])).logits[0].float()


# the largest logit difference accepted per type, for logits of spread ~1 (the
# tiny model's): f16 rounding, then 8-bit and 4-bit blocks of 32 weights
LOGIT_ATOL = {"f16": 2e-3, "q8_0": 2e-2, "q4_1": 0.25, "q4_0": 0.25}


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_1", "q4_0"])
def test_export_reads_back_with_gguf_and_transformers(folder, tmp_path, qtype):
    import gguf

    from kubetune_trainer import gguf_export as G

    report = G.write(folder, tmp_path / f"m-{qtype}.gguf", qtype, "tiny")
    assert report.fallback == [] and report.tensors == 2 + 2 * 9 + 1  # embd, norm, output

    reader = gguf.GGUFReader(report.path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.freq_base"].contents() == 50000.0
    assert fields["llama.context_length"].contents() == 2048
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.chat_template"].contents() == CHAT
    tokens = fields["tokenizer.ggml.tokens"].contents()
    config = json.loads((folder / "config.json").read_text())
    assert len(tokens) == config["vocab_size"] and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want = qtype.upper()
    assert types["blk.0.attn_q.weight"] == want and types["blk.1.ffn_down.weight"] == want
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    # 4-bit files keep the embedding and the head at 8 bits
    high = "Q8_0" if qtype in ("q4_1", "q4_0") else want
    assert types["token_embd.weight"] == high and types["output.weight"] == high

    # transformers dequantizes the file: the same model, within the type's error
    original = G._load_folder(folder)
    loaded, tok = G.load(Path(report.path))
    diff = (_logits(loaded) - _logits(original)).abs().max().item()
    assert diff < LOGIT_ATOL[qtype], diff
    pairs = [(tok(t)["input_ids"], tok(t)["input_ids"]) for t in CORPUS[:3]]
    check = G.check(Path(report.path), folder, qtype, pairs, reference=original)
    assert check.tensors_ok and check.tokenizer_ok, check.problems
    assert check.within_tolerance and abs(check.relative_increase) < check.tolerance


def test_rows_off_the_block_size_stay_f16_and_are_named(tmp_path):
    import gguf

    from kubetune_trainer import gguf_export as G

    folder = tiny_folder(tmp_path / "m", hidden=48)  # rows of 48 values: not blocks of 32
    report = G.write(folder, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report.path).tensors}
    assert "blk.0.attn_q.weight" in report.fallback
    assert types["blk.0.attn_q.weight"] == "F16"
    # ffn_down's rows are intermediate_size (96) long: quantized
    assert "blk.0.ffn_down.weight" not in report.fallback
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert "output.weight" not in types  # tied embeddings: one tensor


def test_other_architectures_and_unknown_types_are_refused_by_field(folder, tmp_path):
    from kubetune_trainer import gguf_export as G

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    with pytest.raises(G.ExportError, match=r"output.gguf: .*not Qwen2ForCausalLM.*remove"):
        G.write(qwen, tmp_path / "q.gguf", "q8_0")
    with pytest.raises(G.ExportError, match=r"output.gguf.types: 'q2_k' is not one of"):
        G.write(folder, tmp_path / "x.gguf", "q2_k")
    scaled = json.loads((folder / "config.json").read_text())
    scaled["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    assert "rope scaling 'yarn'" in G.supported(scaled)


def test_kubetune_run_refuses_gguf_of_another_architecture_before_training(tmp_path):
    from kubetune_api import load_trainer_config, spec_to_trainer_config
    from kubetune_trainer.preflight import Report, check_gguf

    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "g"},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"train": {"uri": str(tmp_path / "t.jsonl")}, "format": "chat"},
            "method": {"type": "full"},
            "output": {"uri": str(tmp_path / "out"), "gguf": {"types": ["q8_0"]}},
        },
    }
    spec = load_trainer_config(spec_to_trainer_config(job)).spec
    report = Report()
    check_gguf(spec, report)
    (error,) = report.errors
    assert error.path == "spec.output.gguf" and "not Qwen2ForCausalLM" in error.message
    assert "remove output.gguf" in error.hint


def test_kubetune_run_summary_lists_each_gguf_file_with_its_score(tmp_path):
    from kubetune_api import storage as contract
    from kubetune_trainer.local import summary
    from kubetune_trainer.storage import JobStorage

    store = JobStorage(str(tmp_path / "p"))
    uri = store.uri("gguf/model-q4_0.gguf")
    gguf = contract.GgufFile(
        type="q4_0",
        uri=uri,
        bytes=3 * 2**20,
        seconds=1.0,
        tensors_ok=True,
        tokenizer_ok=True,
        eval_loss=2.8,
        reference_eval_loss=2.5,
        relative_increase=0.12,
        tolerance=0.10,
        within_tolerance=False,
    )
    store.write_record(contract.OUTPUTS, contract.OutputsRecord(steps=2, gguf=[gguf]))
    line = next(x for x in summary(store).splitlines() if "gguf q4_0:" in x)
    assert "model-q4_0.gguf (3.0 MiB, held-out loss 2.8000 (+12.00%, BEYOND 10%))" in line
