"""UNet students: they start as the teacher, read w through the guidance embedding, and train
(full weights or LoRA) with the iCD losses."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from icd_lite.losses import ICDConfig, icd_training_step
from icd_lite.schedule import default_boundaries
from icd_lite.students import UNetStudent, add_lora, student_from_teacher, trainable_parameters


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.randn(n, 5, 16, generator=g))


def test_student_starts_as_the_teacher_for_every_w():
    teacher = tiny_teacher()
    student = student_from_teacher(teacher)
    x, t, cond = inputs()
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=cond).sample
        for w in (0.0, 7.0, 19.0):
            got = student(x, t, t, cond, torch.full((4,), w))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_guidance_embedding_reaches_the_output_once_trained():
    student = student_from_teacher(tiny_teacher())
    torch.nn.init.normal_(student.unet.time_embedding.cond_proj.weight, std=0.1)
    x, t, cond = inputs()
    with torch.no_grad():
        a = student(x, t, t, cond, torch.zeros(4))
        b = student(x, t, t, cond, torch.full((4,), 7.0))
    assert (a - b).abs().max() > 1e-4


def test_bad_teachers_and_students_are_rejected():
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        UNetStudent(tiny_teacher())
    with pytest.raises(ValueError, match="already has a guidance embedding"):
        student_from_teacher(student_from_teacher(tiny_teacher()).unet)


def test_lora_trains_only_adapters_and_the_guidance_projection():
    student = add_lora(student_from_teacher(tiny_teacher()), rank=4)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "cond_proj" in n for n in names)
    assert any("lora_" in n for n in names)
    with pytest.raises(ValueError, match="none of the LoRA targets"):
        add_lora(student_from_teacher(tiny_teacher()), targets=["no_such_layer"])


@pytest.mark.parametrize("lora", [False, True])
def test_icd_steps_on_unet_students_lower_the_loss(lora):
    teacher = tiny_teacher()
    reverse, forward = student_from_teacher(teacher), student_from_teacher(teacher)
    if lora:
        reverse, forward = add_lora(reverse, rank=4), add_lora(forward, rank=4)
    optimizers = [torch.optim.AdamW(trainable_parameters(m), lr=3e-3) for m in (reverse, forward)]
    config = ICDConfig(default_boundaries(2), w_code_choices=(0.0, 3.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g) * 0.5
    cond, null = torch.randn(8, 5, 16, generator=g), torch.zeros(8, 5, 16)

    def teacher_eps(x, t, c):
        with torch.no_grad():
            return teacher(x, t, encoder_hidden_states=c).sample

    before = {n: p.detach().clone() for n, p in reverse.named_parameters() if p.requires_grad}
    history = [icd_training_step(reverse, forward, teacher_eps, *optimizers, x0, cond, null,
                                 config, torch.Generator().manual_seed(step))
               for step in range(12)]
    total = [sum(h.values()) for h in history]
    assert sum(total[-3:]) < sum(total[:3])
    assert set(history[0]) == {"reverse_cd", "forward_cd", "forward_preservation",
                               "reverse_preservation"}
    changed = [n for n, p in reverse.named_parameters() if p.requires_grad
               and not torch.equal(p, before[n])]
    assert changed
