"""PyTorch references for parity tests: torchvision, the `lpips` package and pytorch-fid.

torchvision 0.28's C extension does not load beside the CPU torch 2.13 we test with: its
import fails registering meta kernels for `torchvision::nms`, an op the extension would have
defined. Its pure-Python model code needs none of the C ops, so if the import fails that way we
define the two missing op schemas ourselves and import again.
"""

import sys
import warnings
from unittest import mock

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


def random_fid_inception_state_dict() -> dict[str, torch.Tensor]:
    """A random FID Inception whose BatchNorm statistics are real: with random statistics the
    activations explode or vanish through the 94 layers and parity would test nothing.

    torchvision's Inception3 blocks have the FID blocks' parameters, so a random one's state
    dict loads into pytorch-fid's own `fid_inception_v3()`. One train-mode pass on a random batch
    with momentum=None (a cumulative average) then sets each running mean and variance to batch
    statistics of realistic inputs. Positive BN biases keep ~70% of the ReLUs on: a random net
    with half of them off is chaotic enough to amplify float32 rounding to ~1e-4 at pool3 (in
    torch too, measured against float64), which would blur the parity test."""
    import_torchvision()  # pytorch_fid imports torchvision, whose C extension may not load
    from pytorch_fid import inception as fid  # noqa: PLC0415

    torch.manual_seed(0)
    random = import_torchvision().models.inception_v3(
        weights=None, num_classes=1008, aux_logits=False, init_weights=True)
    with mock.patch.object(fid, "load_state_dict_from_url", return_value=random.state_dict()):
        model = fid.fid_inception_v3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.5, 0.2)
                module.momentum = None
                module.reset_running_stats()
        model.fc.bias.normal_(0.0, 1.0)
        model.train()(2 * torch.rand(4, 3, 299, 299) - 1)
    return model.eval().state_dict()
