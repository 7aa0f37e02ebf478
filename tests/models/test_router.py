import torch

from diffperc.models import DiT
from diffperc.models.router import PatchEmbedRouter

from helpers import tiny_dit


def _dit() -> DiT:
    return tiny_dit(randomize=0.1).eval()


def test_router_routes_are_widened_copies_of_the_pretrained_projection():
    model = _dit()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([5, 50, 500])
    reference = model(x, t, torch.tensor([0, 1, 2]))
    model.x_embedder = PatchEmbedRouter.from_patch_embed(model.x_embedder, [2, 3, 3])  # depth, flow, amodal
    assert [r.proj.in_channels for r in model.x_embedder.routes] == [6, 9, 9]
    # k + 1 copies of one latent through each route give the pretrained response (zero padding is ignored).
    padded = torch.cat([x, x, x], 1)
    padded[0, 6:] = 0
    torch.testing.assert_close(model(padded, t, torch.tensor([0, 1, 2])), reference, rtol=1e-5, atol=1e-6)


def test_router_sample_output_independent_of_other_tasks_in_batch():
    model = _dit()
    model.x_embedder = PatchEmbedRouter.from_patch_embed(model.x_embedder, [2, 3, 3])
    with torch.no_grad():
        for route in model.x_embedder.routes:
            route.proj.weight.normal_(0, 0.1)
    x, t, y = torch.randn(4, 9, 8, 8), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 1, 2, 1])
    x[0, 6:] = 0
    full = model(x, t, y)
    other = x.clone()
    other[1:] = torch.randn(3, 9, 8, 8)  # change every other sample (of other tasks)
    torch.testing.assert_close(model(other, t, y)[0], full[0], rtol=0, atol=1e-6)
    alone = model(x[:1, :6], t[:1], y[:1])  # a depth sample alone, without padding
    torch.testing.assert_close(alone[0], full[0], rtol=1e-5, atol=1e-6)


def test_router_route_gets_gradients_only_from_its_task():
    model = _dit().train()
    model.x_embedder = PatchEmbedRouter.from_patch_embed(model.x_embedder, [2, 3, 3])
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1)  # let gradients flow past the zero-initialised output
    x, t, y = torch.randn(2, 9, 8, 8), torch.tensor([5, 50]), torch.tensor([0, 2])
    model(x, t, y).pow(2).mean().backward()
    grads = [r.proj.weight.grad for r in model.x_embedder.routes]
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0  # no flow sample in the batch


def test_router_gives_a_task_absent_from_the_batch_an_exact_zero_gradient():
    # DDP with find_unused_parameters=False fails when a parameter gets no gradient: in a mixed batch that holds no
    # sample of a task, that task's route must still be in the graph, with gradient exactly 0 and unchanged outputs.
    torch.manual_seed(0)
    router = PatchEmbedRouter([6, 9, 9], patch_size=2, hidden_size=8)
    x, task_ids = torch.randn(3, 9, 4, 4), torch.tensor([0, 2, 0])
    out = router(x, task_ids)
    out.square().sum().backward()
    assert torch.equal(router.routes[1].proj.weight.grad, torch.zeros_like(router.routes[1].proj.weight))
    assert torch.equal(router.routes[1].proj.bias.grad, torch.zeros_like(router.routes[1].proj.bias))
    assert router.routes[0].proj.weight.grad.abs().sum() > 0 and router.routes[2].proj.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # the zero term changes no output: same as without autograd, bit for bit
        torch.testing.assert_close(router(x, task_ids), out.detach(), rtol=0, atol=0)
        expected = torch.cat([router.routes[i](x[n : n + 1, : [6, 9, 9][i]]) for n, i in enumerate(task_ids.tolist())])
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)  # batched vs per-sample convolution
