"""PERFT adapters in PyTorch: attach them to transformers' OLMoE / Mixtral and run HF `generate` (`perft-jax[torch]`).

    model = transformers.AutoModelForCausalLM.from_pretrained("runs/demo/base_hf")   # e.g. a `--export`
    model = perft_jax.pytorch.load_perft_adapters(model, "runs/demo/run/best_adapters")
    out = model.generate(**tokenizer(prompts, return_tensors="pt"), max_new_tokens=32)

The runtime patches the model in place: every sparse-MoE block gets its variant's adapters (PERFT-S / D / R / E;
LoRA or parallel adapters; top-K or DynMoLE routing; both `adapter_gate_weights` forms) beside the frozen base,
computing what perft_jax computes (tests/pytorch: float32 logits within 1e-5, greedy `generate` token for token).
qv_lora is delegated to HF PEFT. The adapters are trainable `nn.Parameter`s (base frozen); the routers'
auxiliary losses are training-only and not provided (inference needs none). Nothing else in perft_jax imports
this package: it needs torch, which perft_jax does not.
"""
from perft_jax.pytorch.attach import attach_perft
from perft_jax.pytorch.loading import load_perft_adapters, read_perft_config, read_perft_metadata

__all__ = ["attach_perft", "load_perft_adapters", "read_perft_config", "read_perft_metadata"]
