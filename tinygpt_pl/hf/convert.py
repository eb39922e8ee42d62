"""Between Hugging Face GPT-2 and our GPT: OpenAI's weights in (hub names or save_pretrained folders), ours out.

The two models compute the same function with the same parameter names (nanoGPT kept GPT-2's), but GPT-2 stores its
four matmul weights as Conv1D, (in, out), where nn.Linear is (out, in), so those are transposed both ways. GPT-2's
arithmetic is our GPT with biases and the tanh GELU ("gelu_new"); what GPT-2 cannot express (rotary positions,
RMSNorm, ...) does not convert.

The hub's files are fetched once with huggingface_hub into its cache (HF_HOME / HF_HUB_CACHE) and read from there
afterwards, also offline. transformers, safetensors and huggingface_hub are the `hf` extra, imported only when a
Hugging Face model is asked for: checkpoints load without them.
"""

import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

from tinygpt_pl.errors import UsageError
from tinygpt_pl.model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 on the Hugging Face hub
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# our activation -> transformers' ACT2FN name (gelu_new is GPT-2's tanh GELU; gelu_pytorch_tanh is the same function)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "relu2": "relu2"}
FROM_HF_ACTIVATIONS = {**{hf: ours for ours, hf in HF_ACTIVATIONS.items()}, "gelu_pytorch_tanh": "gelu_tanh"}
# what GPT-2's architecture fixes, as GPTConfig values
GPT2_ARCHITECTURE = {"pos_emb": "learned", "feed_forward": True, "residual": True, "norm": "layernorm",
                     "qk_norm": False, "logit_softcap": None}  # fmt: skip
# config.json values GPT-2 models may have that our GPT computes differently
GPT2_FIXED_CONFIG = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False}  # fmt: skip
TOKENIZER_KEY = "tinygpt_pl_tokenizer"  # in an exported config.json: the tokenizer's state_dict()


def import_hf(module: str) -> ModuleType:
    """A module of the hf extra, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"Hugging Face models need {module.split('.')[0]}: pip install 'tinygpt_pl[hf]'") from None


def hf_file(source: str, filename: str) -> Path:
    """filename of a save_pretrained folder, or of a GPT-2 on the hub: from huggingface_hub's cache, where a first
    use downloads it (GPT-2's files never change, so a cached copy is never checked against the hub)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise UsageError(f"{source} has no {filename}: pass a folder that transformers' save_pretrained wrote")
        return path
    if source not in GPT2_NAMES:
        raise UsageError(
            f"{source!r} is neither a checkpoint file, a Hugging Face GPT-2 folder nor a GPT-2 on the hub: "
            f"pass a .ckpt, a folder, or one of {', '.join(GPT2_NAMES)}"
        )
    hub = import_hf("huggingface_hub")
    try:
        return Path(hub.hf_hub_download(source, filename, local_files_only=True))
    except hub.errors.LocalEntryNotFoundError:
        pass
    try:
        return Path(hub.hf_hub_download(source, filename))
    except (OSError, hub.errors.HfHubHTTPError) as e:
        raise UsageError(
            f"could not download {filename} of {source} from the Hugging Face hub ({type(e).__name__}), and "
            f"huggingface_hub's cache ({hub.constants.HF_HUB_CACHE}) has no copy: connect to the internet once, "
            "or pass a local folder that save_pretrained wrote"
        ) from None


def hf_config(source: str) -> dict:
    """The config.json of a Hugging Face GPT-2 (folder or hub name)."""
    return json.loads(hf_file(source, "config.json").read_text())


def gpt_config_from_hf(config: dict, source: str) -> dict:
    """The GPTConfig values (without dropout) of a Hugging Face GPT-2 config: its shape, biases and activation."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UsageError(f"{source} is a {model_type!r} model, not GPT-2: pass a GPT-2 model")
    n_embd, activation = config["n_embd"], config.get("activation_function", "gelu_new")
    differ = {key: config[key] for key, value in GPT2_FIXED_CONFIG.items() if config.get(key, value) != value}
    if config.get("n_inner") not in (None, 4 * n_embd):
        differ["n_inner"] = config["n_inner"]
    if activation not in FROM_HF_ACTIVATIONS:
        differ["activation_function"] = activation
    if differ:
        key, value = next(iter(differ.items()))
        raise UsageError(
            f"{source}: config.json has {key}={value!r}, which tinygpt_pl's GPT cannot express: "
            "pass a GPT-2 model without it"
        )
    return dict(
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=n_embd,
        bias=True,
        activation=FROM_HF_ACTIVATIONS[activation],
        tie_weights=config.get("tie_word_embeddings", True),
        **GPT2_ARCHITECTURE,
    )


def hf_weights(source: str) -> dict[str, torch.Tensor]:
    """The safetensors weights of a Hugging Face model, in its own names and layout (a sharded folder too)."""
    load_file = import_hf("safetensors.torch").load_file
    folder = Path(source).expanduser()
    index = folder / "model.safetensors.index.json"
    if folder.is_dir() and index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {name: t for shard in shards for name, t in load_file(folder / shard).items()}
    return load_file(hf_file(source, "model.safetensors"))


def gpt_state_from_hf(weights: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """Our GPT's state_dict from GPT-2's weights: Conv1D weights transposed, the causal-mask buffers of older files
    skipped, positions cropped to block_size (nanoGPT's crop_block_size)."""
    state = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not name.startswith(("transformer.", "lm_head.")):  # files of GPT2Model, as the hub's GPT-2 are
            name = "transformer." + name
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied: save_pretrained writes it once
    return state


def hf_config_from_gpt(config: GPTConfig, vocab_size: int) -> dict:
    """transformers' GPT2Config values for our GPT (vocab_size: without padding rows); refuses, in one line, a model
    that GPT-2's architecture cannot express."""
    for key, value in GPT2_ARCHITECTURE.items():
        if getattr(config, key) != value:
            raise UsageError(
                f"the model has {key}={getattr(config, key)!r}, which GPT-2's architecture cannot express "
                f"(it has {key}={value!r}): only models with GPT-2's architecture export to transformers"
            )
    if config.activation not in HF_ACTIVATIONS:
        raise UsageError(f"activation {config.activation!r} has no transformers equivalent: it cannot be exported")
    return dict(
        vocab_size=vocab_size,
        n_positions=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        activation_function=HF_ACTIVATIONS[config.activation],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        tie_word_embeddings=config.tie_weights,
    )


def hf_state_from_gpt(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """GPT-2's weights from our GPT's: Conv1D weights transposed, padding rows of the vocabulary cropped, and zero
    biases where the model has none (bias=False)."""
    ours = model.state_dict()
    state = {}
    for name, tensor in ours.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab_size]
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
        if name.startswith(("transformer.h.", "transformer.ln_f.")) and name.endswith(".weight"):
            state.setdefault(name.removesuffix("weight") + "bias", tensor.new_zeros(tensor.shape[0]))
    return {name: tensor.contiguous() for name, tensor in state.items()}
