//! Graph consistency: every input produced, names unique, nodes in topological order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::attr::node_label;
use crate::error::{Error, Result};
use crate::onnx::GraphProto;

/// Check that the graph is a DAG in topological order in which every node input and graph output
/// is produced (by a graph input, an initializer or an earlier node) and no name is produced twice.
pub fn check_graph(g: &GraphProto) -> Result<()> {
    let mut known: HashSet<&str> = HashSet::new();
    for v in &g.input {
        known.insert(v.name());
    }
    for t in &g.initializer {
        known.insert(t.name());
    }
    let producers: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    for (i, n) in g.node.iter().enumerate() {
        for inp in &n.input {
            if inp.is_empty() || known.contains(inp.as_str()) {
                continue;
            }
            return Err(match producers.get(inp.as_str()) {
                Some(&j) if j >= i => Error::Graph(format!(
                    "node '{}' ({}) reads '{inp}' before node '{}' produces it (not in topological order, or a cycle)",
                    node_label(n),
                    n.op_type(),
                    node_label(&g.node[j])
                )),
                _ => Error::Graph(format!(
                    "node '{}' ({}) reads '{inp}', which nothing produces",
                    node_label(n),
                    n.op_type()
                )),
            });
        }
        for out in &n.output {
            if out.is_empty() {
                continue;
            }
            if !known.insert(out.as_str()) {
                return Err(Error::Graph(format!(
                    "'{out}' is produced twice (again by node '{}')",
                    node_label(n)
                )));
            }
        }
    }
    for o in &g.output {
        if !known.contains(o.name()) {
            return Err(Error::Graph(format!(
                "graph output '{}' is produced by nothing",
                o.name()
            )));
        }
    }
    Ok(())
}

/// Reorder nodes topologically (stable: a graph already in order is left as it is).
/// A cycle is an error naming a node on it.
pub fn topo_sort(g: &mut GraphProto) -> Result<()> {
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.as_str(), i))
        })
        .collect();
    let mut indegree = vec![0usize; g.node.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); g.node.len()];
    for (i, n) in g.node.iter().enumerate() {
        let mut seen = HashSet::new();
        for x in &n.input {
            if let Some(&p) = producer.get(x.as_str())
                && seen.insert(p)
            {
                indegree[i] += 1;
                consumers[p].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = indegree
        .iter()
        .enumerate()
        .filter(|(_, d)| **d == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(g.node.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &c in &consumers[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(Reverse(c));
            }
        }
    }
    if order.len() < g.node.len() {
        let stuck = (0..g.node.len()).find(|&i| indegree[i] > 0).unwrap_or(0);
        let n = &g.node[stuck];
        return Err(Error::Graph(format!(
            "the graph has a cycle through node '{}' ({})",
            node_label(n),
            n.op_type()
        )));
    }
    drop(producer);
    let mut nodes: Vec<Option<_>> = std::mem::take(&mut g.node).into_iter().map(Some).collect();
    g.node = order.into_iter().filter_map(|i| nodes[i].take()).collect();
    Ok(())
}
