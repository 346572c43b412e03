"""Learn and render many identities without a ComfyUI server (docs/batch.md). Run it with the Python that
runs ComfyUI, e.g.  python custom_nodes/ComfyUI-SeFi-IDE/sefi_batch.py learn --checkpoint ... --photos ... --out ..."""
import importlib.util
import sys
from pathlib import Path

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("sefi_bootstrap", Path(__file__).resolve().parent / "cli" / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    bootstrap.register_pack_namespace()
    from sefi_ide.cli.batch import main

    sys.exit(main())
