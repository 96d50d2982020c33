"""Run by tests/test_lora_consumers.py in its own process, with the `diffsynth` package (DiffSynth-Studio,
the ArtAug authors' library) importable from the consumers folder and not from the main environment.

    python tests/consumers/diffsynth_fuse.py OUT LORA... --dim 32 --heads 2 --double 2 --single 2

For each LORA file: builds DiffSynth's own FLUX blocks (`FluxJointTransformerBlock`,
`FluxSingleTransformerBlock`) at the given width, under the attribute names of its `FluxDiT`
(`blocks`, `single_blocks`), fuses the file with its `FluxLoRALoader`, and writes every weight that
changed, as after - before, to OUT/<i>.safetensors (i: the file's position); prints the changed names.
"""

import argparse
import json
import os

import torch
from diffsynth.models.flux_dit import FluxJointTransformerBlock, FluxSingleTransformerBlock
from diffsynth.utils.lora.flux import FluxLoRALoader
from safetensors.torch import load_file, save_file


class DiffSynthBlocks(torch.nn.Module):
    """The block part of DiffSynth's FluxDiT (whose constructor fixes FLUX.1's 3072 width and 57 blocks)."""

    def __init__(self, dim: int, heads: int, double: int, single: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(FluxJointTransformerBlock(dim, heads) for _ in range(double))
        self.single_blocks = torch.nn.ModuleList(
            FluxSingleTransformerBlock(dim, heads) for _ in range(single)
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("loras", nargs="+")
    for name in ("--dim", "--heads", "--double", "--single"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args()
    changed_names = []
    for index, lora in enumerate(args.loras):
        torch.manual_seed(0)
        model = DiffSynthBlocks(args.dim, args.heads, args.double, args.single).double()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        FluxLoRALoader(torch_dtype=torch.float64).fuse_lora_to_base_model(model, load_file(lora))
        after = model.state_dict()
        changed = {
            k: (after[k] - before[k]).contiguous() for k in before if not torch.equal(after[k], before[k])
        }
        if changed:
            save_file(changed, os.path.join(args.out, f"{index}.safetensors"))
        changed_names.append(sorted(changed))
    print(json.dumps(changed_names))


if __name__ == "__main__":
    main()
