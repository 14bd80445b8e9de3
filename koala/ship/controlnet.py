"""A stock SDXL ControlNet driving a student: the teacher-shaped residuals re-indexed onto the student's layers.

An SDXL ControlNet returns one residual per output the teacher's encoder passes to its decoder (conv_in, every
encoder layer, every downsampler: 9 for SDXL) and one for the mid block. A student keeps fewer encoder layers, and
diffusers' U-Net pairs residuals with its own skip connections by position (a silent `zip`), so a stock ControlNet
feeds the wrong layers or fails on a shape. `residual_sources(plan)` is, from the inheritance map, the teacher
residual each student skip connection takes; `fit_controlnet` wraps a loaded ControlNet (sharing its weights) so
its forward returns exactly those, and the stock `StableDiffusionXLControlNetPipeline` runs the student with it:

    plan = resolve(SDXL_UNET_CONFIG, get_spec("koala-700m"))
    controlnet = fit_controlnet(ControlNetModel.from_pretrained("/models/controlnet-canny-sdxl"), plan)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained("outputs/koala-700m/export", controlnet=controlnet)

The mid-block residual is added where the student's mid block ends, or, for a student without one, to the
encoder output the teacher's mid block would have received (diffusers' own behaviour).
"""

from __future__ import annotations

from typing import Any

from accelerate import init_empty_weights
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetOutput

from koala.models.unets import Plan


def residual_sources(plan: Plan) -> list[int]:
    """For every down-block residual the student consumes (diffusers order), the teacher residual index it takes."""
    t, n = plan.teacher, plan.teacher.num_stages
    out, index = [0], 1  # residual 0 is conv_in's output
    for i in range(n):
        out += [index + k for k in plan.encoder_keep[i]]  # each kept encoder layer <- the layer it inherits
        index += len(t.down_depth[i])
        if i < n - 1:  # every stage but the last ends in a downsampler
            out.append(index)
            index += 1
    return out


def teacher_residual_count(plan: Plan) -> int:
    """How many down-block residuals the teacher's encoder produces (conv_in, layers, downsamplers)."""
    t = plan.teacher
    return 1 + sum(len(d) for d in t.down_depth) + t.num_stages - 1


def teacher_residuals(plan: Plan) -> list[tuple[str, int]]:
    """Name and channel width of every down-block residual of the teacher's encoder, in diffusers order."""
    t = plan.teacher
    out = [("conv_in", t.channels[0])]
    for i in range(t.num_stages):
        out += [(f"down_blocks.{i} layer {k}", t.channels[i]) for k in range(len(t.down_depth[i]))]
        if i < t.num_stages - 1:
            out.append((f"down_blocks.{i} downsampler", t.channels[i]))
    return out


def check_widths(controlnet: ControlNetModel, plan: Plan) -> None:
    """Every residual the ControlNet adds must have the width of the skip connection it is added to."""
    named = teacher_residuals(plan) + [("mid_block", plan.teacher.channels[-1])]
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    wrong = [f"{name}: {conv.out_channels} channels, the student's has {want}" for (name, want), conv in zip(named, convs)
             if conv.out_channels != want]  # fmt: skip
    if wrong:
        raise ValueError(
            f"the ControlNet's residuals do not fit the student's skip connections ({'; '.join(wrong)}): it was made "
            f"for a U-Net of block_out_channels {list(controlnet.config.block_out_channels)}, the student's teacher has "
            f"{list(plan.teacher.channels)}"
        )


class StudentControlNet(ControlNetModel):
    """A ControlNetModel whose forward returns the residuals of the student's kept layers only."""

    student_sources: list[int] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> ControlNetOutput | tuple:
        """The stock ControlNet forward, its down-block residuals picked by `student_sources`."""
        return_dict = kwargs.get("return_dict", True)
        out = super().forward(*args, **kwargs)
        down, mid = (out.down_block_res_samples, out.mid_block_res_sample) if return_dict else out
        if self.student_sources is not None:
            down = tuple(down[i] for i in self.student_sources)
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid) if return_dict else (down, mid)


def fit_controlnet(controlnet: ControlNetModel, plan: Plan) -> StudentControlNet:
    """A StudentControlNet sharing `controlnet`'s weights (no copy) that feeds the student `plan` describes; a
    ControlNet whose residual count or widths do not fit the student's skip connections is refused here, naming
    them, not at the first pipeline call."""
    have, want = len(controlnet.controlnet_down_blocks), teacher_residual_count(plan)
    if have != want:
        raise ValueError(
            f"the ControlNet produces {have} down-block residuals but the student's teacher has {want} encoder "
            "outputs: it is not a ControlNet for this teacher (an SDXL ControlNet has 9)"
        )
    check_widths(controlnet, plan)
    with init_empty_weights():
        fitted = StudentControlNet.from_config(controlnet.config)
    fitted.load_state_dict(controlnet.state_dict(), assign=True)
    fitted.student_sources = residual_sources(plan)
    first = next(controlnet.parameters())
    return fitted.to(device=first.device, dtype=first.dtype).eval()
