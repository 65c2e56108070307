//! The graph editor every pass uses: fresh names, initializers set or replaced, uses of a tensor
//! pointed elsewhere, and dead nodes removed. Subgraphs (If / Loop / Scan bodies) may read a tensor
//! of the main graph by name; [`reads`] sees those reads, so nothing a body reads is removed.

use std::collections::HashSet;

use crate::onnx::{GraphProto, NodeProto, TensorProto};

/// A tensor name not used in the graph yet: `base`, else `base_1`, `base_2`, ... (initializers,
/// graph inputs and outputs, and every node's inputs and outputs count as used).
pub fn unique_name(g: &GraphProto, base: &str) -> String {
    let mut taken: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    taken.extend(g.input.iter().map(|v| v.name()));
    taken.extend(g.output.iter().map(|v| v.name()));
    for n in &g.node {
        taken.extend(n.output.iter().map(String::as_str));
        taken.extend(n.input.iter().map(String::as_str));
    }
    if !taken.contains(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !taken.contains(n.as_str()))
        .expect("an unbounded range yields a free name")
}

/// Insert an initializer, or replace the one of the same name.
pub fn set_initializer(g: &mut GraphProto, t: TensorProto) {
    match g.initializer.iter_mut().find(|x| x.name() == t.name()) {
        Some(slot) => *slot = t,
        None => g.initializer.push(t),
    }
}

/// Point every input of `nodes` that reads `from` at `to` (graph outputs are not touched).
/// Returns how many inputs changed.
pub fn replace_uses<'a>(
    nodes: impl IntoIterator<Item = &'a mut NodeProto>,
    from: &str,
    to: &str,
) -> usize {
    let mut changed = 0;
    for n in nodes {
        for x in n.input.iter_mut().filter(|x| *x == from) {
            *x = to.to_string();
            changed += 1;
        }
    }
    changed
}

/// Take node `i` out of the graph: whatever read its first output reads `input` instead. When that
/// output is a graph output, the node becomes an `Identity` of `input` and keeps the name.
pub fn bypass(g: &mut GraphProto, i: usize, input: &str) {
    let output = g.node[i].output[0].clone();
    if g.output.iter().any(|o| o.name() == output) {
        let n = &mut g.node[i];
        n.op_type = Some("Identity".into());
        n.domain = None;
        n.input = vec![input.to_string()];
        n.output.truncate(1);
        n.attribute.clear();
        return;
    }
    g.node.remove(i);
    replace_uses(&mut g.node, &output, input);
}

/// Every tensor name read from inside a subgraph of `g`'s nodes, at any depth. A pass must not
/// remove or rename these.
pub fn subgraph_reads(g: &GraphProto) -> HashSet<String> {
    fn walk(nodes: &[NodeProto], out: &mut HashSet<String>) {
        for n in nodes {
            out.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
            for a in &n.attribute {
                for sub in a.g.iter().chain(&a.graphs) {
                    walk(&sub.node, out);
                }
            }
        }
    }
    let mut out = HashSet::new();
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                walk(&sub.node, &mut out);
            }
        }
    }
    out
}

/// Every tensor name `nodes` read, directly or from their subgraphs, plus `g`'s outputs.
pub fn reads(g: &GraphProto, nodes: &[NodeProto]) -> HashSet<String> {
    let mut out = subgraph_reads(&GraphProto {
        node: nodes.to_vec(),
        ..Default::default()
    });
    for n in nodes {
        out.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
    }
    out.extend(g.output.iter().map(|o| o.name().to_string()));
    out
}

/// Remove the nodes nothing reads (no node, subgraph or graph output reads any of their outputs),
/// repeatedly, then the initializers and value infos left unused. Returns how many nodes went.
pub fn remove_dead(g: &mut GraphProto) -> usize {
    let mut removed = 0;
    loop {
        let read = reads(g, &g.node);
        let before = g.node.len();
        g.node
            .retain(|n| n.output.iter().any(|o| !o.is_empty() && read.contains(o)));
        if g.node.len() == before {
            break;
        }
        removed += before - g.node.len();
    }
    let read = reads(g, &g.node);
    let inputs: HashSet<String> = g.input.iter().map(|v| v.name().to_string()).collect();
    g.initializer
        .retain(|t| read.contains(t.name()) || inputs.contains(t.name()));
    let produced: HashSet<String> = g.node.iter().flat_map(|n| n.output.clone()).collect();
    g.value_info.retain(|v| produced.contains(v.name()));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::node;
    use crate::model::float_value_info;
    use crate::tensor::from_f32;

    /// x -> Relu(a) -> Neg(b) -> y, plus a dead Sigmoid(c) reading a and an unused initializer.
    fn graph() -> GraphProto {
        GraphProto {
            node: vec![
                node("Relu", "r", &["x"], &["a"], vec![]),
                node("Neg", "n", &["a"], &["y"], vec![]),
                node("Sigmoid", "s", &["a"], &["c"], vec![]),
            ],
            input: vec![float_value_info("x", &["1"])],
            output: vec![float_value_info("y", &["1"])],
            initializer: vec![from_f32("unused", &[1], &[1.0])],
            ..Default::default()
        }
    }

    #[test]
    fn unique_names_skip_every_used_name() {
        let g = graph();
        assert_eq!(unique_name(&g, "a"), "a_1");
        assert_eq!(unique_name(&g, "unused"), "unused_1");
        assert_eq!(unique_name(&g, "x"), "x_1");
        assert_eq!(unique_name(&g, "fresh"), "fresh");
    }

    #[test]
    fn set_initializer_replaces_by_name() {
        let mut g = graph();
        set_initializer(&mut g, from_f32("unused", &[2], &[1.0, 2.0]));
        set_initializer(&mut g, from_f32("w", &[1], &[3.0]));
        assert_eq!(g.initializer.len(), 2);
        assert_eq!(g.initializer[0].dims, vec![2]);
    }

    #[test]
    fn replace_uses_counts_and_leaves_outputs() {
        let mut g = graph();
        assert_eq!(replace_uses(&mut g.node, "a", "x"), 2);
        assert_eq!(g.node[0].output, vec!["a".to_string()]);
        assert_eq!(
            remove_dead(&mut g),
            2,
            "Relu (its output unread now) and Sigmoid"
        );
    }

    #[test]
    fn bypass_rewires_readers_or_keeps_a_graph_output_as_identity() {
        let mut g = graph();
        bypass(&mut g, 0, "x");
        assert_eq!(g.node.len(), 2);
        assert_eq!(g.node[0].input, vec!["x".to_string()]);
        assert_eq!(g.node[1].input, vec!["x".to_string()]);
        bypass(&mut g, 0, "x");
        assert_eq!(g.node.len(), 2, "a graph output is never removed");
        assert_eq!(g.node[0].op_type(), "Identity");
        assert_eq!(
            (g.node[0].input[0].as_str(), g.node[0].output[0].as_str()),
            ("x", "y")
        );
    }

    #[test]
    fn dead_nodes_and_unused_initializers_go_but_subgraph_reads_stay() {
        let mut g = graph();
        assert_eq!(remove_dead(&mut g), 1);
        assert!(g.initializer.is_empty());
        assert_eq!(g.node.len(), 2);
        // a body reading `c` keeps the Sigmoid
        let mut g = graph();
        let body = GraphProto {
            node: vec![node("Identity", "i", &["c"], &["z"], vec![])],
            ..Default::default()
        };
        let mut attr = crate::attr::int("unused", 0);
        attr.g = Some(body);
        g.node.push(node("If", "if", &["x"], &["w"], vec![attr]));
        g.output.push(float_value_info("w", &["1"]));
        assert!(subgraph_reads(&g).contains("c"));
        assert_eq!(remove_dead(&mut g), 0);
    }
}
