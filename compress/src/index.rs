//! Producer / consumer look-ups over a graph, rebuilt after each mutation.

use std::collections::HashMap;

use whittle_core::onnx::GraphProto;

/// Who produces and who reads each tensor.
#[derive(Debug, Default)]
pub struct Index {
    /// tensor → (node index, output slot)
    pub producer: HashMap<String, (usize, usize)>,
    /// tensor → [(node index, input slot)]
    pub consumers: HashMap<String, Vec<(usize, usize)>>,
    /// Names of graph outputs.
    pub graph_outputs: Vec<String>,
}

impl Index {
    /// Index a graph.
    pub fn new(g: &GraphProto) -> Index {
        let mut ix = Index {
            graph_outputs: g.output.iter().map(|o| o.name().to_string()).collect(),
            ..Default::default()
        };
        for (i, n) in g.node.iter().enumerate() {
            for (k, o) in n.output.iter().enumerate() {
                ix.producer.insert(o.clone(), (i, k));
            }
            for (k, x) in n.input.iter().enumerate() {
                if !x.is_empty() {
                    ix.consumers.entry(x.clone()).or_default().push((i, k));
                }
            }
        }
        ix
    }

    /// The readers of a tensor.
    pub fn readers(&self, t: &str) -> &[(usize, usize)] {
        self.consumers.get(t).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Whether a tensor is a graph output.
    pub fn is_output(&self, t: &str) -> bool {
        self.graph_outputs.iter().any(|o| o == t)
    }
}
