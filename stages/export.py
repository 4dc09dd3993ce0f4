"""Export stage: the real diffusers model -> ONNX (torch dynamo exporter), one graph for the whole profile.

Weights are never loaded, copied or upcast. The model is built from the checkpoint's config with every
parameter on the meta device, traced on meta (torch.onnx, `optimize=False`: the optimiser's constant folding
would read meta data), and optimised with the parameters invisible to it. Each parameter then becomes an
external-data initializer pointing into the checkpoint's safetensors shard (see stages.graphs.weights), in the
checkpoint's own dtype; the graph computes in fp32 (the reference precision), so a bf16 weight enters through
one Cast node. Buffers computed at construction (RoPE inverse frequencies, the VAE's de-normalisation
constants) and constants the optimiser folds are small and written inline. The tiny fp32 checkpoint takes
the same path, so CI exercises it.

Node names are rewritten from the exporter's module scopes (`/transformer_blocks/3/attn/add_q_proj/MatMul_7`)
so later stages can select nodes by module path: the text branch to freeze, the patterns a recipe excludes.
"""

from __future__ import annotations

import ast
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stages import log
from stages.families import DEFAULT_FAMILY, FAMILIES, component_module
from stages.graphs import weights
from stages.graphs.onnx_io import save_model
from stages.graphs.weights import external_initializer
from stages.inputs import StageInputs
from stages.store.digests import FILE_DIGESTS, FileDigests
from stages.store.local import CACHE_DIR

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

LOG = log.get("export")

MODEL_FILE = "model.onnx"
KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)
ONNX_FLOAT = 1


@dataclass(frozen=True)
class ExportOnnx:
    component: str
    checkpoint_dir: Path
    text_length: int
    opset: int
    family: str = DEFAULT_FAMILY
    shared_copy: Callable[[Path, str], Path] | None = None  # the store's copy of a shard on another filesystem
    digest_memo: Path | None = None  # the build's checkpoint-digest memo: shard digests the store need not rehash

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        spec = component_module(self.component, self.family)
        folder = self.checkpoint_dir / FAMILIES[self.family].components[self.component].config_folder
        started = time.perf_counter()
        tensors = weights.checkpoint_tensors(folder)
        with parameters_on_meta():
            model = spec.architecture(self.checkpoint_dir)
        LOG.info(f"tracing with torch.onnx (dynamo) on meta, opset {self.opset}")
        names: dict[str, str] = {}
        program, inputs = export_program(spec, model, self.text_length, self.opset, weight_names=names)
        renamed = name_nodes_by_module(program.model)
        graph = _serialize_without_weights(program.model, set(names))
        keys = spec.checkpoint_keys(model) if hasattr(spec, "checkpoint_keys") else {}
        used = {tensor for node in graph.graph.node for tensor in node.input} | {o.name for o in graph.graph.output}
        located = {name: tensors.get(keys.get(param, param)) for name, param in names.items() if name in used}
        missing = [name for name, location in located.items() if location is None]
        if missing:
            raise KeyError(f"{folder}: no checkpoint tensor for {missing[:3]}")
        casts = attach_weights(graph, located)
        files = self._place_files({loc.file for loc in located.values()}, folder, out_dir)
        save_model(graph, out_dir / MODEL_FILE)
        LOG.info(f"wrote {MODEL_FILE} in {time.perf_counter() - started:.1f}s")
        extras = spec.export_extras(self.checkpoint_dir, out_dir, self.text_length) if hasattr(spec, "export_extras") else {}
        referenced = sum(loc.length for loc in located.values())
        return {
            **extras,
            "component": self.component,
            "model_file": MODEL_FILE,
            "external_data": True,
            "parameter_bytes": referenced,
            "weights": {
                "in_place": len(located),
                "bytes_referenced": referenced,
                "dtypes": dict(Counter(loc.dtype for loc in located.values()).most_common()),
                "cast_to_fp32": casts,
                "files": files,
            },
            "opset": self.opset,
            "text_length": self.text_length,
            "nodes": len(graph.graph.node),
            "op_types": dict(Counter(node.op_type for node in graph.graph.node).most_common()),
            "renamed_nodes": renamed,
            "inputs": {name: list(tensor.shape) for name, tensor in inputs.items()},
        }

    def _place_files(self, files: set[str], folder: Path, out_dir: Path) -> dict[str, str]:
        """Link each referenced shard beside the graph; record the digests the build already knows."""
        digests = FileDigests(self.digest_memo).of(folder, files) if self.digest_memo else {}
        placed = {}
        for name in sorted(files):
            placed[name] = weights.place_checkpoint_file(folder / name, out_dir / name, digests.get(name), self.shared_copy)
            if name in digests:
                weights.note_known_digest(out_dir, name, digests[name])
        return placed


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get parameters on the meta device (no memory, no init cost); buffers stay real.

    Buffers are computed from the config at construction (RoPE frequencies, constants) and are not in the
    checkpoint, so their values are kept for the graph. Like accelerate's `init_empty_weights`, without it."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def export_program(spec: ModuleType, model: Any, text_length: int, opset: int,
                   weight_names: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The one way a component is traced: its model module's wrapper, example inputs and dynamic axes.

    A model with real weights is exported and optimised as torch.onnx does by default. A model whose parameters
    are on meta is traced on meta and optimised with its parameters hidden; `weight_names` is then filled with
    {graph initializer name: model parameter name} for the caller to attach the checkpoint's tensors."""
    import torch

    on_meta = any(p.is_meta for p in model.parameters())
    inputs = spec.example_inputs(model, text_length)
    with spec.export_wrapper(model) as wrapper, torch.no_grad():
        buffers: dict[str, Any] = {}
        kwargs = inputs
        if on_meta:
            by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
            names = {name: by_id[id(p)] for name, p in wrapper.named_parameters(remove_duplicate=False)}
            if weight_names is not None:
                weight_names.update(names)
            buffers = {name: b.detach().clone() for name, b in wrapper.named_buffers() if not b.is_meta}
            wrapper.to("meta")
            kwargs = {name: tensor.to("meta") for name, tensor in inputs.items()}
        program = torch.onnx.export(
            wrapper,
            args=(),
            kwargs=kwargs,
            input_names=list(inputs),
            output_names=spec.OUTPUT_NAMES,
            dynamic_shapes=spec.dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            optimize=not on_meta,
            verbose=False,
        )
    if on_meta:
        _optimize_without_weights(program, set(names), buffers)
    return program, inputs


def _optimize_without_weights(program: Any, parameters: set[str], buffers: dict[str, Any]) -> None:
    """Run torch.onnx's optimiser with parameter initializers valueless (it can fold nothing computed from a
    weight, and never reads one) and buffer initializers holding their real values."""
    import onnx_ir as ir

    for name, value in program.model.graph.initializers.items():
        if name in parameters:
            value.const_value = None
        elif name in buffers:
            value.const_value = ir.tensor(buffers[name].cpu().numpy(), name=name)
        elif value.const_value is not None and getattr(value.const_value, "raw", None) is not None \
                and getattr(value.const_value.raw, "is_meta", False):
            raise ValueError(f"initializer {name} was traced on meta but is neither a parameter nor a buffer")
    import logging

    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    dedup.setLevel(logging.ERROR)  # otherwise one "skipped deduplication" warning per (valueless) weight
    try:
        with _single_node_rewrites_only():
            program.optimize()
    finally:
        dedup.setLevel(level)


@contextlib.contextmanager
def _single_node_rewrites_only() -> Iterator[None]:
    """Leave out onnxscript's rewrite rules whose pattern ends in several nodes (SlicesSplit: two Slices of one
    tensor become a Split) for the optimiser's run.

    Its matcher pairs every candidate node with every node of the graph, so export time grew with the square
    of the layer count: 2 / 8 / 60 transformer layers took 13 / 27 / 882 s. The Slices it would fuse stay
    Slices, which compute the same values."""
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r._target_pattern.has_single_output_node)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _serialize_without_weights(model: Any, parameters: set[str]) -> Any:
    """ModelProto of the graph and its small constants; parameter initializers left out (attached next)."""
    import onnx_ir as ir

    for name in [n for n in model.graph.initializers if n in parameters]:
        model.graph.initializers.pop(name)
    return ir.serde.serialize_model(model)


def attach_weights(graph: Any, located: dict[str, Any]) -> int:
    """Add each weight as an external initializer in the checkpoint's dtype; a non-fp32 weight feeds its
    consumers through one Cast to fp32, named by its module path (so module patterns select it). Returns the
    number of Casts."""
    import onnx

    renamed: dict[str, str] = {}
    casts = []
    for name, location in sorted(located.items()):
        graph.graph.initializer.append(external_initializer(name, location))
        if location.onnx_type == ONNX_FLOAT:
            continue
        module, _, leaf = name.removeprefix("model").lstrip(".").rpartition(".")
        node_name = "/" + module.replace(".", "/") + f"/Cast_{leaf}" if module else f"/Cast_{leaf}"
        renamed[name] = f"{name}::fp32"
        casts.append(onnx.helper.make_node("Cast", [name], [renamed[name]], name=node_name, to=ONNX_FLOAT))
    for node in graph.graph.node:
        for index, tensor in enumerate(node.input):
            if tensor in renamed:
                node.input[index] = renamed[tensor]
    graph.graph.node.extend(casts)
    return len(casts)


def name_nodes_by_module(model: Any) -> int:
    """Give each node `/<module path>/<op>_<n>` and drop bulky exporter metadata (stack traces, fx nodes)."""
    counts: Counter[str] = Counter()
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        module = ""
        if scopes:
            path = [scope for scope in ast.literal_eval(scopes)[:-1] if scope]
            module = path[-1].removeprefix("model").lstrip(".") if path else ""
        prefix = "/" + module.replace(".", "/") if module else ""
        base = f"{prefix}/{node.op_type}"
        node.name = f"{base}_{counts[base]}"
        counts[base] += 1
        for key in list(node.metadata_props):
            if key not in KEPT_METADATA:
                del node.metadata_props[key]
    return sum(counts.values())


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> ExportOnnx:
    assert component is not None
    settings = loaded.recipe.components[component].export
    return ExportOnnx(component, inputs.weights, loaded.recipe.text_length, settings.opset, loaded.recipe.family,
                      shared_copy=inputs.shared_copy, digest_memo=inputs.root / CACHE_DIR / FILE_DIGESTS)
