"""Session-wide test settings."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def no_compile_caches():
    """Compile from scratch: torch's on-disk FX-graph and autograd caches are not keyed on a
    custom op's Python autograd formula, so a graph cached by an older checkout would call
    an op with the schema it had then."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        yield
