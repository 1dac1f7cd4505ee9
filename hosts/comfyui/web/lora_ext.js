// lora-ext: shows the LoRA Inspector's report on the node (ComfyUI's frontend shows a node's
// {"ui": {"text": [...]}} only where an extension puts it in a widget, as it does for Preview Any).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "lora-ext.Inspector",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoraExtInspector") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created ? created.apply(this, arguments) : undefined;
      const w = ComfyWidgets["STRING"](this, "report_text", ["STRING", { multiline: true }], app).widget;
      w.element.readOnly = true;
      w.serialize = false;
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      if (executed) executed.apply(this, arguments);
      const w = (this.widgets || []).find((x) => x.name === "report_text");
      const text = message && message.text;
      if (w && text) w.value = Array.isArray(text) ? text.join("\n") : String(text);
    };
  },
});
