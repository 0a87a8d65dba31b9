import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recranker_jax.retrieval.graph import build_graph, choose_backend, propagate
from recranker_jax.retrieval.models import LightGCN, bpr_loss

# Tiny graph: 3 users, 4 items; user 2 and item 3 have no edges (degree 0).
USERS = np.array([0, 0, 1, 1, 1, 0])  # the last pair repeats (0, 1): counts once
ITEMS = np.array([0, 1, 1, 2, 0, 1])


def full_adjacency_propagation(users, items, layers):
    """Independent reference: the (U+I) x (U+I) adjacency A = [[0, R], [R^T, 0]],
    D^-1/2 A D^-1/2 with 0 for degree-0 nodes, layer mean of E, AE, A^2E, ..."""
    n_users, n_items = users.shape[0], items.shape[0]
    R = np.zeros((n_users, n_items))
    R[USERS, ITEMS] = 1.0
    A = np.block([[np.zeros((n_users, n_users)), R], [R.T, np.zeros((n_items, n_items))]])
    degree = A.sum(1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    norm = inv_sqrt[:, None] * A * inv_sqrt[None, :]
    E = np.concatenate([users, items])
    layer, total = E, E.copy()
    for _ in range(layers):
        layer = norm @ layer
        total += layer
    total /= layers + 1
    return total[:n_users], total[n_users:]


@pytest.mark.parametrize("backend", ["dense", "edges"])
def test_propagation_equals_the_normalised_full_adjacency(backend):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    graph = build_graph(USERS, ITEMS, 3, 4, backend)
    # Weights by hand: deg(u0)=2, deg(u1)=3, deg(i0)=2, deg(i1)=2, deg(i2)=1 -> w(u1, i2) = 1/sqrt(3)
    weights = dict(zip(zip(np.asarray(graph.edge_user).tolist(), np.asarray(graph.edge_item).tolist()),
                       np.asarray(graph.edge_weight).tolist()))
    assert len(weights) == 5
    assert weights[(1, 2)] == pytest.approx(1 / np.sqrt(3))
    assert weights[(0, 1)] == pytest.approx(1 / np.sqrt(4))
    got_users, got_items = propagate(graph, jnp.asarray(users, jnp.float32), jnp.asarray(items, jnp.float32), 3)
    want_users, want_items = full_adjacency_propagation(users, items, 3)
    np.testing.assert_allclose(got_users, want_users, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_items, want_items, rtol=1e-5, atol=1e-6)
    # Degree-0 nodes only keep their own layer-0 share: E / (K + 1).
    np.testing.assert_allclose(got_users[2], users[2] / 4, rtol=1e-6)
    assert np.isfinite(np.asarray(got_items)).all()


def test_dense_and_edge_backends_give_equal_embeddings_and_gradients():
    rng = np.random.default_rng(1)
    n_users, n_items = 30, 50
    users = rng.integers(0, n_users, 300)
    items = rng.integers(0, n_items, 300)
    batch = [jnp.asarray(rng.integers(0, n, 64)) for n in (n_users, n_items, n_items)] + [jnp.ones(64)]
    results = {}
    for backend in ("dense", "edges"):
        graph = build_graph(users, items, n_users, n_items, backend)
        model = LightGCN(n_users, n_items, 8, 2, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        loss_fn = lambda p: bpr_loss(nnx.merge(graphdef, p), graph, *batch, 1e-4)
        value, grads = jax.value_and_grad(loss_fn)(params)
        results[backend] = (model.embeddings(graph), float(value), grads)
    (u_d, i_d), loss_d, g_d = results["dense"]
    (u_e, i_e), loss_e, g_e = results["edges"]
    np.testing.assert_allclose(u_d, u_e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(i_d, i_e, rtol=1e-5, atol=1e-6)
    assert loss_d == pytest.approx(loss_e, rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_e)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bpr_loss_matches_a_numpy_formula():
    rng = np.random.default_rng(2)
    model = LightGCN(6, 7, 4, 0, rngs=nnx.Rngs(3))  # 0 layers: embeddings are the tables
    graph = build_graph(np.array([0]), np.array([0]), 6, 7, "edges")
    user, pos, neg = rng.integers(0, 6, 5), rng.integers(0, 7, 5), rng.integers(0, 7, 5)
    weight = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is padding
    U, I = np.asarray(model.user_embedding[...]), np.asarray(model.item_embedding[...])
    real = slice(0, 4)
    margin = (U[user] * (I[pos] - I[neg])).sum(1)[real]
    bpr = np.mean(np.log1p(np.exp(-margin)))
    reg = 1e-2 * 0.5 * ((U[user] ** 2).sum(1) + (I[pos] ** 2).sum(1) + (I[neg] ** 2).sum(1))[real].sum() / 4
    got = bpr_loss(model, graph, jnp.asarray(user), jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(weight), 1e-2)
    assert float(got) == pytest.approx(bpr + reg, rel=1e-5)


def test_auto_backend_prefers_edges_for_sparse_graphs():
    assert choose_backend(664, 9066, 50_000) == "edges"  # the embedded MovieLens: 0.8% dense
    assert choose_backend(100, 100, 2_000) == "dense"


def test_benchmark_pytorch_lightgcn_computes_the_same_loss():
    torch = pytest.importorskip("torch", reason="the PyTorch reference needs the test extra")
    from recranker_jax.bench.torch_lightgcn import TorchLightGCN

    rng = np.random.default_rng(4)
    n_users, n_items = 20, 30
    users, items = rng.integers(0, n_users, 150), rng.integers(0, n_items, 150)
    keys = np.unique(users * n_items + items)
    users, items = keys // n_items, keys % n_items
    model = LightGCN(n_users, n_items, 8, 2, rngs=nnx.Rngs(0))
    reference = TorchLightGCN(n_users, n_items, 8, 2, users, items)
    with torch.no_grad():
        reference.user_embedding.copy_(torch.from_numpy(np.array(model.user_embedding[...])))
        reference.item_embedding.copy_(torch.from_numpy(np.array(model.item_embedding[...])))
    batch = [rng.integers(0, n, 16) for n in (n_users, n_items, n_items)]
    graph = build_graph(users, items, n_users, n_items, "edges")
    want = bpr_loss(model, graph, *map(jnp.asarray, batch), jnp.ones(16), 1e-3)
    got = reference.bpr_loss(*(torch.from_numpy(b) for b in batch), 1e-3)
    assert got.detach().item() == pytest.approx(float(want), rel=1e-5)
