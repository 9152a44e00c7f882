"""Wan weight import, checkpoint loading, and export to PyTorch.

Names load lazily so that `wamjax.export.torch_wam` (torch only) imports without JAX.
"""

_LAZY = {
    "import_diffusers_wan": "wan_import",
    "import_diffusers_wan_vae": "wan_vae_import",
    "export_diffusers_vae_state": "wan_vae_import",
    "load_checkpoint": "load",
    "load_model_config": "load",
    "load_norm_stats": "load",
    "export_checkpoint": "to_torch",
    "import_wam": "to_torch",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"wamjax.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'wamjax.export' has no attribute {name!r}")
