#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels

/// The CUDA backend's library, loaded at run time with dlopen: `libpea_cuda.so` (nvcc, `make cuda`) or its
/// emulated twin `libpea_cuda_emu.so` (g++ against CKernels/emu, `make cuda-emu`). Both export the C ABI of
/// `CKernels/include/pea_cuda.h`; this type resolves each of its functions by name into a Swift
/// `@convention(c)` function pointer. The package never links against the library (its C declarations are
/// visible through the CKernels module but must not be called), so one `pea` binary runs with and without a
/// GPU.
///
/// The context and memory functions are required; an op whose function the library lacks (a library built
/// before that kernel existed) leaves its pointer nil and is listed in `missingSymbols`: `CUDABackend` then
/// reports that op as unsupported and throws, naming the symbol, if it is called.
///
/// Search order (`locate`): `$PEA_CUDA_LIB` (a file, or a folder holding libpea_cuda.so; when set, nothing else
/// is tried); `libpea_cuda.so` beside the running executable (`/proc/self/exe`); then, in the current directory
/// and in each folder above the executable that holds Package.swift (the repository of a `swift build`),
/// `.build-cuda/libpea_cuda.so` and `libpea_cuda.so` (where `make cuda` writes it). The emulated library is
/// never picked by the search: name it with PEA_CUDA_LIB (or pass its path) to use it.
///
/// A library stays loaded for the rest of the process (never dlclose'd: CUDA runtimes do not like unloading).
public final class CUDALibrary {
    /// The file that was loaded (absolute when it could be resolved).
    public let path: String
    /// The names of the pea_cuda_* functions the library does not export (empty for a complete library).
    public let missingSymbols: [String]
    /// Whether the library is a complete implementation of this ABI.
    public var isComplete: Bool { missingSymbols.isEmpty }

    let handle: UnsafeMutableRawPointer

    // MARK: the ABI as Swift function types (pea_cuda.h, in its order; size_t is Int, int is Int32)

    typealias Context = OpaquePointer
    typealias RawIn = UnsafeRawPointer
    typealias RawOut = UnsafeMutableRawPointer
    typealias Strides = UnsafePointer<Int64>

    typealias ABIVersionFn = @convention(c) () -> Int32
    typealias CreateFn = @convention(c) (Int32, UnsafeMutablePointer<Context?>?, UnsafeMutablePointer<CChar>?, Int) -> Int32
    typealias DestroyFn = @convention(c) (Context?) -> Void
    typealias LastErrorFn = @convention(c) (Context?) -> UnsafePointer<CChar>?
    typealias DeviceInfoFn = @convention(c) (Context?, UnsafeMutablePointer<CChar>?, Int, UnsafeMutablePointer<Int32>?,
                                             UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int>?) -> Int32
    typealias SetTF32Fn = @convention(c) (Context?, Int32) -> Int32

    typealias AllocFn = @convention(c) (Context?, Int, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Int32
    typealias FreeFn = @convention(c) (Context?, RawOut?) -> Int32
    typealias ReleaseCacheFn = @convention(c) (Context?) -> Int32
    typealias MemoryStatsFn = @convention(c) (Context?, UnsafeMutablePointer<Int>?, UnsafeMutablePointer<Int>?,
                                              UnsafeMutablePointer<UInt64>?) -> Int32
    typealias UploadFn = @convention(c) (Context?, RawOut?, RawIn?, Int) -> Int32
    typealias DownloadFn = @convention(c) (Context?, RawOut?, RawIn?, Int) -> Int32
    typealias ZeroFn = @convention(c) (Context?, RawOut?, Int) -> Int32
    typealias SynchronizeFn = @convention(c) (Context?) -> Int32

    typealias GemmFn = @convention(c) (Context?, Int32, Int32, Int32, Int64, Int64, Int64, Float,
                                       RawIn?, Int64, Int64, RawIn?, Int64, Int64, Float,
                                       RawOut?, Int64, Int64, Int64) -> Int32
    typealias LinearFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawOut?, Int64, Int64, Int64) -> Int32
    typealias Conv2dFn = @convention(c) (Context?, Int32, UnsafePointer<ck_conv2d_params>?, RawIn?, RawIn?, RawIn?, RawOut?) -> Int32
    typealias GroupNormFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawOut?, Int64, Int64, Int64, Int64,
                                            Float, Int32) -> Int32
    typealias LayerNormFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawOut?, Int64, Int64, Float) -> Int32
    typealias SoftmaxFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Int64) -> Int32
    typealias AttentionFn = @convention(c) (Context?, Int32, UnsafePointer<ck_attention_params>?) -> Int32
    typealias ActivationFn = @convention(c) (Context?, Int32, Int32, RawIn?, RawOut?, Int64) -> Int32
    typealias GegluFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Int64) -> Int32
    typealias AffineFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Float, Float) -> Int32
    typealias BinaryFn = @convention(c) (Context?, Int32, Int32, RawIn?, Strides?, RawIn?, Strides?, RawOut?, Strides?, Int32) -> Int32
    typealias CopyStridedFn = @convention(c) (Context?, RawIn?, Strides?, RawOut?, Strides?, Strides?, Int32, Int64) -> Int32
    typealias UpsampleFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Int64, Int64) -> Int32
    typealias EmbeddingFn = @convention(c) (Context?, Int32, RawIn?, Int32, Int64, RawIn?, Int64, Int64, RawOut?) -> Int32
    typealias TimestepEmbeddingFn = @convention(c) (Context?, Int32, RawIn?, Int32, Int64, Int64, Int32, Float, Float, Float,
                                                    RawOut?) -> Int32
    typealias MeanFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Int64, Int64) -> Int32
    typealias ConvertFn = @convention(c) (Context?, RawIn?, Int32, RawOut?, Int32, Int64) -> Int32

    typealias Conv2dBackwardDataFn = @convention(c) (Context?, Int32, UnsafePointer<ck_conv2d_params>?, RawIn?, RawIn?, RawOut?) -> Int32
    typealias GroupNormBackwardFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawIn?, RawOut?, Int64, Int64, Int64,
                                                    Int64, Float, Int32) -> Int32
    typealias LayerNormBackwardFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawOut?, RawOut?, RawOut?, Int64, Int64,
                                                    Float) -> Int32
    typealias SoftmaxBackwardFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawOut?, Int64, Int64) -> Int32
    typealias ActivationBackwardFn = @convention(c) (Context?, Int32, Int32, RawIn?, RawIn?, RawOut?, Int64) -> Int32
    typealias GegluBackwardFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawOut?, Int64, Int64) -> Int32
    typealias UpsampleBackwardFn = @convention(c) (Context?, Int32, RawIn?, RawOut?, Int64, Int64, Int64) -> Int32

    typealias TimerRecordFn = @convention(c) (Context?, Int32) -> Int32
    typealias TimerElapsedFn = @convention(c) (Context?, Int32, Int32, UnsafeMutablePointer<Float>?) -> Int32
    typealias SpinFn = @convention(c) (Context?, Double) -> Int32
    typealias AdamWFn = @convention(c) (Context?, UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?,
                                        UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>?,
                                        UnsafeMutablePointer<Float>?, Int64, UnsafePointer<ck_adamw_hyper>?) -> Int32
    typealias SumSquaresFn = @convention(c) (Context?, UnsafePointer<Float>?, Int64, UnsafeMutablePointer<Double>?) -> Int32
    typealias ProfileStartFn = @convention(c) (Context?) -> Int32
    typealias ProfileStopFn = @convention(c) (Context?, UnsafeMutablePointer<pea_cuda_profile_entry>?, Int32,
                                              UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Double>?) -> Int32

    // MARK: required functions (the library is refused without them)

    let abiVersion: ABIVersionFn
    let create: CreateFn
    let destroy: DestroyFn
    let lastError: LastErrorFn
    let alloc: AllocFn
    let free: FreeFn
    let upload: UploadFn
    let download: DownloadFn
    let synchronize: SynchronizeFn

    // MARK: optional functions (nil: not in this build of the library; see missingSymbols)

    let deviceInfo: DeviceInfoFn?
    let setTF32: SetTF32Fn?
    let releaseCache: ReleaseCacheFn?
    let memoryStats: MemoryStatsFn?
    let zero: ZeroFn?
    let gemm: GemmFn?
    let linear: LinearFn?
    let conv2d: Conv2dFn?
    let groupNorm: GroupNormFn?
    let layerNorm: LayerNormFn?
    let softmax: SoftmaxFn?
    let attention: AttentionFn?
    let activation: ActivationFn?
    let geglu: GegluFn?
    let affine: AffineFn?
    let binary: BinaryFn?
    let copyStrided: CopyStridedFn?
    let upsampleNearest2x: UpsampleFn?
    let embedding: EmbeddingFn?
    let timestepEmbedding: TimestepEmbeddingFn?
    let mean: MeanFn?
    let convert: ConvertFn?
    let conv2dBackwardData: Conv2dBackwardDataFn?
    let groupNormBackward: GroupNormBackwardFn?
    let layerNormBackward: LayerNormBackwardFn?
    let softmaxBackward: SoftmaxBackwardFn?
    let activationBackward: ActivationBackwardFn?
    let gegluBackward: GegluBackwardFn?
    let upsampleNearest2xBackward: UpsampleBackwardFn?
    let timerRecord: TimerRecordFn?
    let timerElapsed: TimerElapsedFn?
    let spin: SpinFn?
    let profileStart: ProfileStartFn?
    let adamw: AdamWFn?
    let sumSquares: SumSquaresFn?
    let profileStop: ProfileStopFn?

    /// Every function of pea_cuda.h, required ones first.
    public static let requiredSymbols = [
        "pea_cuda_abi_version", "pea_cuda_create", "pea_cuda_destroy", "pea_cuda_last_error", "pea_cuda_alloc",
        "pea_cuda_free", "pea_cuda_upload", "pea_cuda_download", "pea_cuda_synchronize",
    ]
    public static let optionalSymbols = [
        "pea_cuda_device_info", "pea_cuda_set_tf32", "pea_cuda_release_cache", "pea_cuda_memory_stats", "pea_cuda_zero",
        "pea_cuda_gemm", "pea_cuda_linear", "pea_cuda_conv2d", "pea_cuda_group_norm", "pea_cuda_layer_norm",
        "pea_cuda_softmax", "pea_cuda_attention", "pea_cuda_activation", "pea_cuda_geglu", "pea_cuda_affine",
        "pea_cuda_binary", "pea_cuda_copy_strided", "pea_cuda_upsample_nearest2x", "pea_cuda_embedding",
        "pea_cuda_timestep_embedding", "pea_cuda_mean", "pea_cuda_convert",
        "pea_cuda_conv2d_backward_data", "pea_cuda_group_norm_backward", "pea_cuda_layer_norm_backward",
        "pea_cuda_softmax_backward", "pea_cuda_activation_backward", "pea_cuda_geglu_backward",
        "pea_cuda_upsample_nearest2x_backward", "pea_cuda_timer_record", "pea_cuda_timer_elapsed", "pea_cuda_spin",
        "pea_cuda_profile_start", "pea_cuda_profile_stop", "pea_cuda_adamw", "pea_cuda_sum_squares",
    ]

    /// Loads the library at `path`, or the first one `locate()` finds. Throws `PEAError.backend` saying where
    /// it looked (none found), why dlopen failed, which required function is missing, or that the ABI
    /// version differs.
    public convenience init(path: String? = nil) throws {
        if let path {
            try self.init(loading: path)
        } else {
            switch Self.locate() {
            case .found(let found): try self.init(loading: found)
            case .notFound(let message): throw PEAError.backend(message)
            }
        }
    }

    private init(loading path: String) throws {
        let resolved = Self.absolute(path)
        guard let handle = dlopen(resolved, RTLD_NOW | RTLD_LOCAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw PEAError.backend("cuda: cannot load \(resolved): \(reason)")
        }
        self.handle = handle
        self.path = resolved

        func required<F>(_ name: String, _: F.Type) throws -> F {
            guard let symbol = dlsym(handle, name) else {
                throw PEAError.backend("cuda: \(resolved) does not export \(name): not a Pea CUDA library, or one built from other sources (rebuild it: make cuda)")
            }
            return unsafeBitCast(symbol, to: F.self)
        }
        var missing: [String] = []
        func optional<F>(_ name: String, _: F.Type) -> F? {
            guard let symbol = dlsym(handle, name) else { missing.append(name); return nil }
            return unsafeBitCast(symbol, to: F.self)
        }

        abiVersion = try required("pea_cuda_abi_version", ABIVersionFn.self)
        let version = abiVersion()
        guard version == Int32(PEA_CUDA_ABI_VERSION) else {
            throw PEAError.backend("cuda: \(resolved) implements pea_cuda ABI version \(version), this pea expects version \(PEA_CUDA_ABI_VERSION); rebuild the library from the same sources (make cuda)")
        }
        create = try required("pea_cuda_create", CreateFn.self)
        destroy = try required("pea_cuda_destroy", DestroyFn.self)
        lastError = try required("pea_cuda_last_error", LastErrorFn.self)
        alloc = try required("pea_cuda_alloc", AllocFn.self)
        free = try required("pea_cuda_free", FreeFn.self)
        upload = try required("pea_cuda_upload", UploadFn.self)
        download = try required("pea_cuda_download", DownloadFn.self)
        synchronize = try required("pea_cuda_synchronize", SynchronizeFn.self)

        deviceInfo = optional("pea_cuda_device_info", DeviceInfoFn.self)
        setTF32 = optional("pea_cuda_set_tf32", SetTF32Fn.self)
        releaseCache = optional("pea_cuda_release_cache", ReleaseCacheFn.self)
        memoryStats = optional("pea_cuda_memory_stats", MemoryStatsFn.self)
        zero = optional("pea_cuda_zero", ZeroFn.self)
        gemm = optional("pea_cuda_gemm", GemmFn.self)
        linear = optional("pea_cuda_linear", LinearFn.self)
        conv2d = optional("pea_cuda_conv2d", Conv2dFn.self)
        groupNorm = optional("pea_cuda_group_norm", GroupNormFn.self)
        layerNorm = optional("pea_cuda_layer_norm", LayerNormFn.self)
        softmax = optional("pea_cuda_softmax", SoftmaxFn.self)
        attention = optional("pea_cuda_attention", AttentionFn.self)
        activation = optional("pea_cuda_activation", ActivationFn.self)
        geglu = optional("pea_cuda_geglu", GegluFn.self)
        affine = optional("pea_cuda_affine", AffineFn.self)
        binary = optional("pea_cuda_binary", BinaryFn.self)
        copyStrided = optional("pea_cuda_copy_strided", CopyStridedFn.self)
        upsampleNearest2x = optional("pea_cuda_upsample_nearest2x", UpsampleFn.self)
        embedding = optional("pea_cuda_embedding", EmbeddingFn.self)
        timestepEmbedding = optional("pea_cuda_timestep_embedding", TimestepEmbeddingFn.self)
        mean = optional("pea_cuda_mean", MeanFn.self)
        convert = optional("pea_cuda_convert", ConvertFn.self)
        conv2dBackwardData = optional("pea_cuda_conv2d_backward_data", Conv2dBackwardDataFn.self)
        groupNormBackward = optional("pea_cuda_group_norm_backward", GroupNormBackwardFn.self)
        layerNormBackward = optional("pea_cuda_layer_norm_backward", LayerNormBackwardFn.self)
        softmaxBackward = optional("pea_cuda_softmax_backward", SoftmaxBackwardFn.self)
        activationBackward = optional("pea_cuda_activation_backward", ActivationBackwardFn.self)
        gegluBackward = optional("pea_cuda_geglu_backward", GegluBackwardFn.self)
        upsampleNearest2xBackward = optional("pea_cuda_upsample_nearest2x_backward", UpsampleBackwardFn.self)
        timerRecord = optional("pea_cuda_timer_record", TimerRecordFn.self)
        timerElapsed = optional("pea_cuda_timer_elapsed", TimerElapsedFn.self)
        spin = optional("pea_cuda_spin", SpinFn.self)
        profileStart = optional("pea_cuda_profile_start", ProfileStartFn.self)
        profileStop = optional("pea_cuda_profile_stop", ProfileStopFn.self)
        adamw = optional("pea_cuda_adamw", AdamWFn.self)
        sumSquares = optional("pea_cuda_sum_squares", SumSquaresFn.self)
        missingSymbols = missing
    }

    /// Where the library was looked for, in order, and which (if any) exists.
    public enum Location: Equatable {
        case found(String)
        /// No library: the message lists every place looked at.
        case notFound(String)
    }

    /// The library file that `init(path: nil)` loads, following the search order above.
    public static func locate() -> Location {
        if let value = environmentLibrary {
            let file = isDirectory(value) ? value + "/libpea_cuda.so" : value
            return fileExists(file) ? .found(file)
                : .notFound("cuda: PEA_CUDA_LIB is set to \(value), but \(file) does not exist")
        }
        let candidates = searchPaths()
        if let first = candidates.first(where: fileExists) { return .found(first) }
        return .notFound("cuda: libpea_cuda.so not found (build it with 'make cuda' on a machine with nvcc, or set PEA_CUDA_LIB); looked in: "
                         + candidates.joined(separator: ", "))
    }

    /// The value of PEA_CUDA_LIB, when set and not empty.
    public static var environmentLibrary: String? {
        guard let variable = getenv("PEA_CUDA_LIB") else { return nil }
        let value = String(cString: variable)
        return value.isEmpty ? nil : value
    }

    /// The places searched when PEA_CUDA_LIB is not set, in order, without duplicates.
    public static func searchPaths() -> [String] {
        var paths: [String] = []
        func add(_ path: String) { if !paths.contains(path) { paths.append(path) } }
        let executableDirectory = executablePath().map(parentFolder)
        if let executableDirectory { add(executableDirectory + "/libpea_cuda.so") }
        var roots: [String] = []
        if let cwd = currentDirectory() { roots.append(cwd) }
        for folder in foldersAboveExecutable() where fileExists(folder + "/Package.swift") && !roots.contains(folder) {
            roots.append(folder)
        }
        for root in roots {
            add(root + "/.build-cuda/libpea_cuda.so")
            add(root + "/libpea_cuda.so")
        }
        return paths
    }

    /// The message of the library's last failed call on `context`.
    func message(_ context: Context?) -> String {
        guard let text = lastError(context) else { return "" }
        return String(cString: text)
    }

    // MARK: file-system helpers (POSIX, no Foundation)

    static func absolute(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { releaseCString(resolved) }
        return String(cString: resolved)
    }

    /// Exists and is not a folder (`isDirectory` is Support/FileSystem.swift's).
    static func fileExists(_ path: String) -> Bool {
        var status = stat()
        return stat(path, &status) == 0 && (status.st_mode & S_IFMT) != S_IFDIR
    }
}

/// free(3) for memory the C library allocated (a file-scope function: inside CUDALibrary `free` is the ABI's).
private func releaseCString(_ pointer: UnsafeMutablePointer<CChar>) { free(pointer) }
