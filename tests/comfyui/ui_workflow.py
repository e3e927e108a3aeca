"""API-format workflow -> UI-format (litegraph) workflow, from ComfyUI's /object_info.

    python tests/comfyui/ui_workflow.py object_info.json example_workflows/x_api.json example_workflows/x.json

The real-ComfyUI tier regenerates the UI files from the API files with the live /object_info and
checks they equal the committed ones, so the two formats cannot drift apart.
"""

from __future__ import annotations

import json
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for section in ("required", "optional"):
        names = info.get("input_order", {}).get(section) or list(info["input"].get(section, {}))
        out += [(n, info["input"][section][n]) for n in names]
    return out


def api_to_ui(api: dict, object_info: dict) -> dict:
    ids = {key: i + 1 for i, key in enumerate(api)}
    depth: dict[str, int] = {}

    def level(key: str) -> int:
        if key not in depth:
            srcs = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[key] = 1 + max((level(s) for s in srcs), default=-1)
        return depth[key]

    links, out_links = [], {}
    nodes = []
    rows: dict[int, int] = {}
    for order, (key, node) in enumerate(sorted(api.items(), key=lambda kv: (level(kv[0]), ids[kv[0]]))):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if _is_widget(spec) and not linked:
                if value is None:
                    value = spec[1].get("default") if len(spec) > 1 else None
                    if value is None and isinstance(spec[0], list):
                        value = spec[0][0]
                widgets.append(value)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
                continue
            if linked:
                src, slot = value
                link_id = len(links) + 1
                kind = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, ids[src], slot, ids[key], len(inputs), kind])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": kind if not _is_widget(spec) else spec[0], "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None})
        col = level(key)
        height = 60 + 24 * (len(widgets) + len(inputs) + len(info["output"])) + (
            150 if node["class_type"] in ("RLR_Trainer", "PreviewImage") else 0) + 60 * sum(
            1 for name, spec in _ordered_inputs(info) if len(spec) > 1 and spec[1].get("multiline"))
        y = rows.get(col, 40)
        rows[col] = y + height + 50
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": [40 + 380 * col, y],
                      "size": [340, height], "flags": {}, "order": order, "mode": 0,
                      "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets, **({"title": node["_meta"]["title"]} if "_meta" in node else {})})
    for n, key in zip(nodes, [k for k, _ in sorted(api.items(), key=lambda kv: (level(kv[0]), ids[kv[0]]))]):
        info = object_info[api[key]["class_type"]]
        n["outputs"] = [{"name": name, "type": kind, "links": out_links.get((key, i), []), "slot_index": i}
                        for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": sorted(nodes, key=lambda n: n["id"]),
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """UI-format workflow -> API format, as the browser does when it queues a workflow: widget values
    by position over the node's widget inputs (a seed's control_after_generate value skipped), links
    to the inputs they feed; widgets the file has no value for take the server's default (an input a
    newer ComfyUI added). Raises ValueError for a node type the server lacks."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:  # muted or bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise ValueError(f"node {node['id']}: this ComfyUI has no {node['type']}")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _ordered_inputs(info):
            if name in linked:  # api_to_ui keeps no value for a linked widget
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                continue
            if not _is_widget(spec):
                continue
            value = values.pop(0) if values else None
            if value is None:
                value = spec[1].get("default") if len(spec) > 1 else None
                if value is None and isinstance(spec[0], list):
                    value = spec[0][0]
            if len(spec) > 1 and spec[1].get("control_after_generate") and values and values[0] in CONTROL_VALUES:
                values.pop(0)
            inputs[name] = value
        graph[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return graph


if __name__ == "__main__":
    info_path, api_path, out_path = sys.argv[1:4]
    ui = api_to_ui(json.load(open(api_path)), json.load(open(info_path)))
    with open(out_path, "w") as f:
        json.dump(ui, f, indent=1)
        f.write("\n")
