//! Where a CUDA tensor's memory is: the address NCCL reduces a gradient bucket at (feature
//! `cuda`; not yet verified on a GPU).
//!
//! burn's CUDA tensors are cubecl tensors (`burn::backend::Cube`, fusion off in this build):
//! a compute client and a handle into cubecl's memory pool. The client hands out the handle's
//! device address (`get_resource`) together with a guard that keeps the allocation in place
//! while it is held. cubecl and NCCL share the device's primary context, so the address is
//! valid for both.

use ballast_collectives::CudaRegion;
use burn::{
    backend::{Cube, CubeDevice},
    tensor::Tensor,
};
use cubecl_core::future::block_on;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

/// The CUDA memory of a flat `f32` tensor, for an in-place reduction: the tensor that will hold
/// the result (the same memory) and the region; `Ok(Err(t))` hands the tensor back when it is not
/// a plain CUDA tensor (another backend, or autodiff), and the caller reads it through the host.
///
/// The tensor is first made the sole, contiguous owner of its memory (a copy on the device when
/// it shares it, as a slice of a larger tensor does), then every kernel queued on the device is
/// waited for, so the region's contents are complete, as [`CudaRegion`] promises.
///
/// # Errors
/// cubecl's message when the device cannot be synchronised or the address not obtained.
pub(crate) fn region_of(t: Tensor<1>) -> Result<Result<(Tensor<1>, CudaRegion), Tensor<1>>, String> {
    let Ok(prim) = t.clone().try_into_primitive::<Cube>() else {
        return Ok(Err(t));
    };
    let CubeDevice::Cuda(device) = &prim.device else {
        drop(prim);
        return Ok(Err(t));
    };
    let ordinal = device.index;
    // Only the primitive holds the memory now (the check of exclusive ownership below counts).
    drop(t);
    let prim = if prim.can_mut() && prim.is_contiguous() && prim.is_contiguous_buffer() {
        prim
    } else {
        prim.copy()
    };
    let len = prim.meta.shape().num_elements();
    // The barrier, and then any error a launch left on this buffer (cubecl attaches a failed
    // allocation or kernel to the buffers it did not write): the contents are complete and
    // were really computed, or the caller learns why not.
    block_on(prim.client.sync_buffers([&prim.handle])).map_err(|e| format!("synchronising cuda:{ordinal}: {e}"))?;
    let resource = prim
        .client
        .get_resource::<<CudaRuntime as Runtime>::Server>(prim.handle.clone())
        .map_err(|e| format!("the address of a gradient bucket on cuda:{ordinal}: {e:?}"))?;
    let ptr = resource.resource().ptr;
    let held = Tensor::from_primitive::<Cube>(prim.clone());
    // The guard keeps the allocation in place; the primitive keeps the handle, so the pool
    // hands this memory to no other tensor while the region lives.
    let keep: Box<dyn std::any::Any> = Box::new((resource, prim));
    // SAFETY: `ptr` is the start of the allocation behind `prim.handle`, which holds `len`
    // contiguous f32 (made contiguous and exclusively owned above) on cuda:`ordinal`, in the
    // device's primary context that cubecl and NCCL share. `sync_buffers` returned after every
    // kernel queued on the device finished, so the contents are complete. `keep` holds the
    // resource guard (the allocation stays in place) and the primitive (the pool gives the
    // memory to no other tensor); `held`, the only other owner, goes to the caller, which leaves
    // it alone until the region is dropped (the contract of `DeviceBuffer::cuda_region`).
    let region = unsafe { CudaRegion::new(ptr, len, ordinal, keep) };
    Ok(Ok((held, region)))
}
