"""The shipped experiment configs (YAML only), installed with the package: base.yaml, data/,
experiment/ and sweep/. tasks.config reads them through importlib.resources, beneath any
directory a team overlays with `--config-dir` or IMF_CONFIG_DIR."""
