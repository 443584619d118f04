"""PyTorch references for parity tests: torchvision and the `lpips` package.

torchvision 0.28's C extension does not load beside the CPU torch 2.13 we test with: its
import fails registering meta kernels for `torchvision::nms`, an op the extension would have
defined. Its pure-Python model code needs none of the C ops, so if the import fails that way we
define the two missing op schemas ourselves and import again.
"""

import sys
import warnings

import torch

_torchvision_schemas = None  # the Library must stay alive for its definitions to persist


def import_torchvision():
    """torchvision, importable whether or not its C extension loads."""
    global _torchvision_schemas
    try:
        import torchvision  # noqa: PLC0415
        return torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [name for name in sys.modules if name.startswith("torchvision")]:
        del sys.modules[name]  # the half-imported package
    if _torchvision_schemas is None:
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_schemas = library
    import torchvision  # noqa: PLC0415
    return torchvision


def lpips_reference(**kwargs):
    """lpips.LPIPS(net="vgg") in eval mode; kwargs as lpips.LPIPS's (e.g. pnet_rand=True)."""
    import_torchvision()
    import lpips  # noqa: PLC0415

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return lpips.LPIPS(net="vgg", verbose=False, **kwargs)
