"""notebooks/quickstart.ipynb runs headless (nbclient) at its smallest setting: 2 training steps,
then encode, decode and the per-sub-codebook grid, with the figures rendered inline."""

import json
import os
import pathlib
import re
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
README = NOTEBOOK.parent.parent / "README.md"
KERNEL_NAME = "fqgan-notebook-test"
CELL_TIMEOUT_S = 600  # per cell; the training cell is the longest, ~1 minute on an idle 2-core CPU
KERNEL_STARTUP_TIMEOUT_S = 180  # nbclient's default 60 s is tight on a busy CI machine


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(notebook):
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def _kernel_env() -> dict:
    """The test process's environment for the kernel, on one CPU device as in Colab: conftest's
    8 simulated devices would split the smoke batch of 16 over 8 devices."""
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend
    env["PYTHONPATH"] = os.pathsep.join(  # the kernel imports this checkout, as pytest does
        [str(NOTEBOOK.parent.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                         if p])
    return env


def _kernel_manager(kernels_dir):
    """A manager for an ipykernel of this interpreter, whatever kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernels_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fqgan_jax notebook test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def test_notebook_is_clean():
    notebook = _read()
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the outputs"
    source = _parameters_cell(notebook).source
    for name in ("WORKDIR", "CHECKPOINT_WORKDIR", "NUM_STEPS", "INSTALL", "REPO_URL"):
        assert re.search(rf"^{name} = ", source, re.M), name


def test_readme_colab_link_matches_repo_url():
    """The README's "Open in Colab" link and the notebook's REPO_URL name the same repository."""
    match = re.search(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/[^/\s]+/"
                      r"notebooks/quickstart\.ipynb", README.read_text())
    if match is None:
        pytest.skip("README has no Open in Colab link yet")
    repo_url = re.search(r'^REPO_URL = "(.*)"', _parameters_cell(_read()).source, re.M).group(1)
    assert repo_url.removesuffix(".git").endswith("/" + match.group(1))


@pytest.mark.slow  # a kernel subprocess that trains: ~1 minute on an idle 2-core CPU
def test_quickstart_notebook_runs(tmp_path):
    notebook = _read()
    cell = _parameters_cell(notebook)
    cell.source += ("\n# Injected by tests/test_notebook.py.\n"
                    f"WORKDIR = {str(tmp_path / 'workdir')!r}\n"
                    "CHECKPOINT_WORKDIR = \"\"\nNUM_STEPS = 2\nINSTALL = False\n")
    client = nbclient.NotebookClient(
        notebook, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT_S,
        startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}})  # the kernel's cwd
    client.execute(env=_kernel_env())  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "codes: shape (8, 16, 16, 2), dtype int32" in text, text[-3000:]
    assert "Not installing (not in Colab)" in text
    assert "JAX devices: [CpuDevice(id=0)]" in text
    assert re.search(r"PSNR: \d+\.\d\d dB", text)
    for name in ("vis", "sem"):
        assert re.search(rf"{name}: \d+ distinct codes of 1024", text)
    images = [output for output in outputs if output.output_type == "display_data"
              and "image/png" in output.get("data", {})]
    assert len(images) >= 2, "expected the reconstruction and per-sub-codebook figures inline"
    assert (tmp_path / "workdir" / "checkpoints" / "2").is_dir()
    assert (tmp_path / "workdir" / "eval" / "2.json").is_file()
