"""Export to PyTorch; Wan weight import and checkpoint loading re-exported from `wamjax.checkpoint`.

Names load lazily so that `wamjax.export.torch_wam` (torch only) imports without JAX.
"""

_LAZY = {
    "import_diffusers_wan": "wamjax.checkpoint.wan_import",
    "import_diffusers_wan_vae": "wamjax.checkpoint.wan_vae_import",
    "export_diffusers_vae_state": "wamjax.checkpoint.wan_vae_import",
    "load_checkpoint": "wamjax.checkpoint.load",
    "load_model_config": "wamjax.checkpoint.load",
    "load_norm_stats": "wamjax.checkpoint.load",
    "export_checkpoint": "wamjax.export.to_torch",
    "import_wam": "wamjax.export.to_torch",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wamjax.export' has no attribute {name!r}")
