import CKernels

/// NCCL on the device (CKernels/cuda/collective.cu): the gradients of `pea train`'s ranks summed where they are,
/// without the trip through the host that the MPI all-reduce needs. NCCL itself is loaded by the CUDA library at
/// run time ($PEA_NCCL_LIB, else libnccl.so.2); the communicator's id travels over MPI.
extension CUDABackend {
    /// Joins an NCCL communicator of `group`'s ranks: rank 0 makes its id and broadcasts it (with whether it could)
    /// over MPI, then every rank joins. Returns false, on every rank alike, when rank 0 cannot load NCCL (with its
    /// reason in `reason`), so the job can fall back to MPI together; a rank that cannot join throws.
    public func joinNCCL(_ group: ProcessGroup, reason: inout String) throws -> Bool {
        guard let uniqueId = library.function("pea_cuda_nccl_unique_id", as: CUDALibrary.NCCLUniqueIdFn.self),
              let join = library.function("pea_cuda_nccl_init", as: CUDALibrary.NCCLInitFn.self),
              library.exports("pea_cuda_nccl_allreduce_sum_f32") else {
            reason = "\(library.path) has no NCCL calls (a library built before them: rebuild it with make cuda)"
            return false
        }
        // [0]: 1 when rank 0 made an id; [1...]: the id.
        var message = [UInt8](repeating: 0, count: 1 + Int(PEA_CUDA_NCCL_ID_BYTES))
        if group.isRoot {
            let status = message.withUnsafeMutableBufferPointer { uniqueId(context.handle, nil, $0.baseAddress! + 1) }
            if status == PEA_CUDA_OK { message[0] = 1 } else { reason = library.message(context.handle) }
        }
        try group.broadcast(&message, from: 0)
        guard message[0] == 1 else {
            if !group.isRoot { reason = "rank 0 could not load NCCL" }
            return false
        }
        let status = message.withUnsafeBufferPointer { join(context.handle, nil, $0.baseAddress! + 1, Int32(group.size), Int32(group.rank)) }
        try check(status, "nccl_init")
        return true
    }

    /// The sum over the communicator's ranks of the f32 tensor `x`, in place (`joinNCCL` first).
    public func allReduceSumInPlace(_ x: Tensor) throws {
        let op = "nccl_allreduce_sum_f32"
        guard x.dtype == .f32 else { throw PEAError.unsupported("\(op): f32 only, got \(x.dtype)") }
        let allReduce = try kernel("pea_cuda_nccl_allreduce_sum_f32", CUDALibrary.NCCLAllReduceFn.self, op)
        try check(allReduce(context.handle, pointer(x)?.assumingMemoryBound(to: Float.self), Int64(x.count)), op)
    }
}
