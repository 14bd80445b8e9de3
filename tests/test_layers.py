"""The import graph keeps its shape: no import cycle, commands imported by no library, and at most the named
imports that run back up the layers (grimp's graph of koala's runtime imports; `if TYPE_CHECKING:` imports run
never and are left out).

The layers, top to bottom (`LAYERS`: a module belongs to the layer of the longest prefix that names it). A module
may import its own layer and any layer below; an import into a higher layer runs back up and must be one of
`UPWARD`. Commands (`COMMANDS`) hold a schema and `main` and are imported by nothing but their entry point.
Run `python tests/test_layers.py` to print the numbers.
"""

from __future__ import annotations

import grimp

# The command modules: `python -m <module>` (and the `koala.bench <name>` subcommands).
COMMANDS = (
    "koala.train.__main__", "koala.demo", "koala.export", "koala.generate", "koala.evaluate", "koala.cache",
    "koala.lora", "koala.inspect", "koala.search", "koala.synth", "koala.fixtures.__main__", "koala.shapes.evaluate", "koala.shapes.teacher",
    "koala.bench.ablation", "koala.bench.data", "koala.bench.fullsize", "koala.bench.gpu", "koala.bench.memory",
    "koala.bench.train", "koala.bench.unet",
)  # fmt: skip
ENTRY_POINTS = {"koala.bench.__main__": "koala.bench."}  # an entry point that dispatches to the commands it names

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("koala.bench.__main__",)),
    ("commands", COMMANDS),
    # what only commands use: the benchmarks' measurements, the student search (koala.pruning) and the demo (which
    # trains, exports and samples)
    ("benchmarks, search and the demo", ("koala.bench", "koala.pruning", "koala.shapes.demo")),
    ("config composition", ("koala.config.compose",)),
    ("train schema", ("koala.config.schema",)),
    # a run and what follows it: the checks of its config and launch, training, evaluation, export, LoRA remapping,
    # the shapes world's judging and teacher
    (
        "runs",
        (
            "koala.config.checks",
            "koala.train",
            "koala.evaluation",
            "koala.ship.export",
            "koala.ship.lora_remap",
            "koala.shapes",
        ),
    ),
    ("fixtures", ("koala.fixtures",)),
    # the parts a run is built from
    ("parts", ("koala.distill", "koala.data", "koala.ship", "koala.shapes.world", "koala.shapes.score")),
    ("models", ("koala.models",)),
    ("ground floor", ("koala", "koala.choice", "koala.errors", "koala.devices", "koala.timing", "koala.rng")),
]

UPWARD: set[tuple[str, str]] = set()  # (importer, imported) allowed to run back up; the target is at most 2


def graph() -> grimp.ImportGraph:
    """koala's internal imports as run (TYPE_CHECKING imports excluded)."""
    return grimp.build_graph("koala", exclude_type_checking_imports=True, cache_dir=None)


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int:
    """Index of the layer whose longest prefix names `module` (0 is the top); -1 when none does."""
    best, index = "", -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, index = p, i
    return index


def imports(g: grimp.ImportGraph) -> set[tuple[str, str]]:
    """Every (importer, imported) pair of koala modules."""
    return {(m, d) for m in g.modules for d in g.find_modules_directly_imported_by(m)}


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (each holds an import loop)."""
    adj: dict[str, list[str]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(adj):  # Tarjan's algorithm, iterative (no recursion limit)
        if root in index:
            continue
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def upward(edges: set[tuple[str, str]], layers=LAYERS) -> list[tuple[str, str]]:
    """Imports into a higher layer than the importer's."""
    return sorted((a, b) for a, b in edges if layer_of(b, layers) < layer_of(a, layers))


def command_imports(edges: set[tuple[str, str]], commands=COMMANDS) -> list[tuple[str, str]]:
    """Imports of a command by anything but the entry point that dispatches to it."""
    return sorted(
        (a, b) for a, b in edges if b in commands and not (a in ENTRY_POINTS and b.startswith(ENTRY_POINTS[a]))
    )


def test_every_module_has_a_layer():
    assert [m for m in sorted(graph().modules) if layer_of(m) < 0] == []


def test_no_import_cycle():
    assert cycles(imports(graph())) == []


def test_imports_run_down_the_layers():
    found = upward(imports(graph()))
    assert set(found) <= UPWARD and len(UPWARD) <= 2, "\n".join(
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})" for a, b in found
    )


def test_no_library_imports_a_command():
    assert command_imports(imports(graph())) == []


if __name__ == "__main__":
    g = graph()
    edges = imports(g)
    print(f"{len(g.modules)} modules, {len(edges)} imports")
    print(f"cycles: {cycles(edges)}")
    print(f"imports that run back up: {upward(edges)}")
    print(f"imports of a command: {command_imports(edges)}")
