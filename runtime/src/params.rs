//! A model's float parameters as flat values: their layout, copies to and from one vector, and
//! a checksum of their bits. Shared by the data-parallel step, host offload and checkpoints.

use burn::{
    module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId},
    tensor::{Tensor, TensorData},
};
use xxhash_rust::xxh3::Xxh3;

/// One parameter as laid out in the fused buffer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamSlot {
    /// Module path, e.g. `l1.weight`.
    pub path: String,
    /// Shape.
    pub dims: Vec<usize>,
    #[serde(skip, default = "ParamId::new")]
    pub(crate) id: ParamId,
}

/// The float parameters of `model` in visiting order, with their paths.
pub fn collect_params<M: Module>(model: &M) -> Vec<ParamSlot> {
    struct Collect {
        path: Vec<String>,
        out: Vec<ParamSlot>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push(ParamSlot {
                path: self
                    .path
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("."),
                dims: param.lazy_shape().dims::<D>().to_vec(),
                id: param.id,
            });
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Every float parameter's values, concatenated in visiting order.
pub fn flatten_params<M: Module>(model: &M) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            self.0.extend(data.iter::<f32>());
        }
    }
    // Sized exactly: the master copy of an offloaded optimizer is this vector, and a doubling
    // growth would hold up to twice the parameters' bytes.
    let mut f = Flatten(Vec::with_capacity(model.num_params()));
    model.visit(&mut f);
    f.0
}

/// Per-parameter values in visiting order.
pub fn param_values<M: Module>(model: &M) -> Vec<Vec<f32>> {
    struct Each(Vec<Vec<f32>>);
    impl ModuleVisitor for Each {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().into_data().iter::<f32>().collect());
        }
    }
    let mut e = Each(Vec::new());
    model.visit(&mut e);
    e.0
}

/// Replaces every float parameter with the next values of `flat` (as from [`flatten_params`]).
///
/// # Panics
/// If `flat` is shorter than the model's parameters.
pub fn load_params<M: Module>(model: M, flat: &[f32]) -> M {
    struct Load<'a> {
        flat: &'a [f32],
        offset: usize,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dims: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
            let n: usize = dims.iter().product();
            let values = self.flat[self.offset..self.offset + n].to_vec();
            self.offset += n;
            param.map(|t| {
                let require_grad = t.is_require_grad();
                let device = t.device();
                Tensor::<D>::from_data(TensorData::new(values, dims), &device).set_require_grad(require_grad)
            })
        }
    }
    model.map(&mut Load { flat, offset: 0 })
}

/// Replaces every float parameter with the next values of `flat`, a flat tensor on the model's
/// (inner) device in [`flatten_params`] order: each parameter becomes a slice of it, and nothing
/// crosses to the host.
///
/// # Panics
/// If `flat` is shorter than the model's parameters.
pub fn load_params_from_tensor<M: Module>(model: M, flat: Tensor<1>) -> M {
    struct Load {
        flat: Tensor<1>,
        offset: usize,
    }
    impl ModuleMapper for Load {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dims: [usize; D] = param.lazy_shape().dims::<D>();
            let n: usize = dims.iter().product();
            let values = self.flat.clone().slice(self.offset..self.offset + n).reshape(dims);
            self.offset += n;
            param.map(|t| {
                let values = if t.is_autodiff() { values.autodiff() } else { values };
                values.set_require_grad(t.is_require_grad())
            })
        }
    }
    model.map(&mut Load { flat, offset: 0 })
}

/// xxh3 over the bits of every parameter, in visiting order: equal exactly when the replicas
/// are bit-identical (up to hash collisions).
pub fn checksum<M: Module>(model: &M) -> u64 {
    struct Hash(Xxh3);
    impl ModuleVisitor for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            for v in data.iter::<f32>() {
                self.0.update(&v.to_bits().to_le_bytes());
            }
        }
    }
    let mut h = Hash(Xxh3::new());
    model.visit(&mut h);
    h.0.digest()
}

/// The values `range` of the flat parameters (as [`flatten_params`] orders them), as one tensor
/// on the parameters' own device, outside any autodiff graph: no copy to the host. `None` for
/// an empty range.
///
/// # Panics
/// If `range` ends past the model's parameters.
pub fn params_range<M: Module>(model: &M, range: std::ops::Range<usize>) -> Option<Tensor<1>> {
    struct Slice {
        range: std::ops::Range<usize>,
        offset: usize,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Slice {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.lazy_shape().num_elements();
            let (start, end) = (self.offset, self.offset + n);
            self.offset = end;
            let (lo, hi) = (start.max(self.range.start), end.min(self.range.end));
            if lo >= hi {
                return;
            }
            let t = param.val();
            let t = if t.is_require_grad() { t.inner() } else { t };
            self.parts.push(t.reshape([n]).slice(lo - start..hi - start));
        }
    }
    let mut s = Slice {
        range: range.clone(),
        offset: 0,
        parts: Vec::new(),
    };
    model.visit(&mut s);
    let covered: usize = s.parts.iter().map(|p| p.shape().num_elements()).sum();
    assert_eq!(
        covered,
        range.len(),
        "parameter range {range:?} past the model's parameters"
    );
    match s.parts.len() {
        0 => None,
        1 => s.parts.pop(),
        _ => Some(Tensor::cat(s.parts, 0)),
    }
}

/// The float type `model`'s parameters are stored in (that of the first one; f32 for a model
/// without float parameters): what its inputs are cast to in a mixed precision.
pub fn float_dtype<M: Module>(model: &M) -> burn::tensor::FloatDType {
    struct First(Option<burn::tensor::DType>);
    impl ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.0.is_none() {
                self.0 = Some(param.val().dtype());
            }
        }
    }
    let mut first = First(None);
    model.visit(&mut first);
    first
        .0
        .map_or(burn::tensor::FloatDType::F32, burn::tensor::FloatDType::from)
}
