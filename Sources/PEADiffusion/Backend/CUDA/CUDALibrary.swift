#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKernels

/// The CUDA backend's library, loaded at run time with dlopen: `libpea_cuda.so` (nvcc, `make cuda`) or its
/// emulated twin `libpea_cuda_emu.so` (g++ against CKernels/emu, `make cuda-emu`). Both export the C ABI of
/// `CKernels/include/pea_cuda.h`; this type resolves every function on that header's PEA_CUDA_FUNCTIONS list by
/// name (`function(_:as:)` hands one out as a Swift `@convention(c)` function pointer). The package never
/// links against the library (its C declarations are visible through the CKernels module but must not be
/// called), so one `pea` binary runs with and without a GPU.
///
/// The list's required functions (context and memory) must be present; an optional one the library lacks (a
/// library built before that kernel existed) is listed in `missingSymbols`: `CUDABackend` then reports the ops
/// that need it as unsupported (the op registry, OpRegistry.swift, says which) and throws, naming the
/// function, if one is called.
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
    typealias LinearFn = @convention(c) (Context?, Int32, RawIn?, RawIn?, RawIn?, RawIn?, RawOut?, Int64, Int64, Int64) -> Int32
    typealias Conv2dFn = @convention(c) (Context?, Int32, UnsafePointer<ck_conv2d_params>?, RawIn?, RawIn?, RawIn?, RawIn?, RawOut?) -> Int32
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
    typealias AttentionBackwardFn = @convention(c) (Context?, Int32, UnsafePointer<ck_attention_params>?, RawIn?, RawOut?,
                                                    RawOut?, RawOut?) -> Int32

    typealias TimerRecordFn = @convention(c) (Context?, Int32) -> Int32
    typealias TimerElapsedFn = @convention(c) (Context?, Int32, Int32, UnsafeMutablePointer<Float>?) -> Int32
    typealias SpinFn = @convention(c) (Context?, Double) -> Int32
    typealias AdamWFn = @convention(c) (Context?, UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?,
                                        UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>?,
                                        UnsafeMutablePointer<Float>?, Int64, UnsafePointer<ck_adamw_hyper>?) -> Int32
    typealias SumSquaresFn = @convention(c) (Context?, UnsafePointer<Float>?, Int64, UnsafeMutablePointer<Double>?) -> Int32
    typealias GraphBeginFn = @convention(c) (Context?) -> Int32
    typealias GraphEndFn = @convention(c) (Context?, UnsafeMutablePointer<OpaquePointer?>?) -> Int32
    typealias GraphReplayFn = @convention(c) (Context?, OpaquePointer?) -> Int32
    typealias GraphDestroyFn = @convention(c) (Context?, OpaquePointer?) -> Int32
    typealias ProfileStartFn = @convention(c) (Context?) -> Int32
    typealias ProfileStopFn = @convention(c) (Context?, UnsafeMutablePointer<pea_cuda_profile_entry>?, Int32,
                                              UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Double>?) -> Int32
    typealias NCCLUniqueIdFn = @convention(c) (Context?, UnsafePointer<CChar>?, UnsafeMutablePointer<UInt8>?) -> Int32
    typealias NCCLInitFn = @convention(c) (Context?, UnsafePointer<CChar>?, UnsafePointer<UInt8>?, Int32, Int32) -> Int32
    typealias NCCLAllReduceFn = @convention(c) (Context?, UnsafeMutablePointer<Float>?, Int64) -> Int32

    // MARK: the functions

    /// pea_cuda.h's PEA_CUDA_FUNCTIONS list, in its order: every function's name and whether a library must
    /// export it.
    public static let abiFunctions: [(name: String, required: Bool)] = {
        var functions: [(String, Bool)] = []
        var required: Int32 = 0
        while let name = pea_cuda_function_name(Int32(functions.count), &required) {
            functions.append((String(cString: name), required != 0))
        }
        return functions
    }()

    static let abiFunctionNames = Set(abiFunctions.map(\.name))

    /// The functions the library exports, by name.
    private let functions: [String: UnsafeMutableRawPointer]

    /// The library's function `name` (one on the list) as the Swift function type `F`; nil when this build of
    /// the library lacks it.
    func function<F>(_ name: String, as _: F.Type) -> F? {
        precondition(Self.abiFunctionNames.contains(name), "\(name) is not on pea_cuda.h's PEA_CUDA_FUNCTIONS list")
        return functions[name].map { unsafeBitCast($0, to: F.self) }
    }

    /// Whether the library exports `name`.
    func exports(_ name: String) -> Bool { functions[name] != nil }

    /// The address of `name` in the library (nil when this build lacks it).
    func address(_ name: String) -> UnsafeMutableRawPointer? { functions[name] }

    /// The required functions used on every allocation and transfer, typed once at load time.
    let alloc: AllocFn, free: FreeFn, upload: UploadFn, download: DownloadFn
    let create: CreateFn, destroy: DestroyFn, synchronize: SynchronizeFn, lastError: LastErrorFn

    /// Loads the library at `path`, or the first one `locate()` finds. Throws `PEAError.backend` saying where
    /// it looked (none found), why dlopen failed, which required function is missing, or that the ABI
    /// version differs.
    public convenience init(path: String? = nil) throws {
        if let path {
            try self.init(loading: path)
        } else {
            switch Self.locate() {
            case .found(let found): try self.init(loading: found)
            case .notFound(let message): throw PEAError.backend(message, kind: .unavailable)
            }
        }
    }

    private init(loading path: String) throws {
        let resolved = Self.absolute(path)
        try Self.checkCompleteSharedLibrary(resolved)
        guard let handle = dlopen(resolved, RTLD_NOW | RTLD_LOCAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw PEAError.backend("cuda: cannot load \(resolved): \(reason)", kind: .unavailable)
        }
        self.handle = handle
        self.path = resolved

        // The version first: a library of another ABI is named as such, whatever else it lacks.
        let versionName = "pea_cuda_abi_version"
        func notOurs(_ name: String) -> PEAError {
            .backend("cuda: \(resolved) does not export \(name): not a Pea CUDA library, or one built from other sources (rebuild it: make cuda)",
                     kind: .unavailable)
        }
        guard let versionSymbol = dlsym(handle, versionName) else { throw notOurs(versionName) }
        let version = unsafeBitCast(versionSymbol, to: ABIVersionFn.self)()
        guard version == Int32(PEA_CUDA_ABI_VERSION) else {
            throw PEAError.backend("cuda: \(resolved) implements pea_cuda ABI version \(version), this pea expects version \(PEA_CUDA_ABI_VERSION); rebuild the library from the same sources (make cuda)",
                                   kind: .unavailable)
        }
        var functions: [String: UnsafeMutableRawPointer] = [:]
        var missing: [String] = []
        for (name, required) in Self.abiFunctions {
            if let symbol = dlsym(handle, name) {
                functions[name] = symbol
            } else if required {
                throw notOurs(name)
            } else {
                missing.append(name)
            }
        }
        self.functions = functions
        missingSymbols = missing
        func required<F>(_ name: String, _: F.Type) -> F { unsafeBitCast(functions[name]!, to: F.self) }  // checked above
        alloc = required("pea_cuda_alloc", AllocFn.self)
        free = required("pea_cuda_free", FreeFn.self)
        upload = required("pea_cuda_upload", UploadFn.self)
        download = required("pea_cuda_download", DownloadFn.self)
        create = required("pea_cuda_create", CreateFn.self)
        destroy = required("pea_cuda_destroy", DestroyFn.self)
        synchronize = required("pea_cuda_synchronize", SynchronizeFn.self)
        lastError = required("pea_cuda_last_error", LastErrorFn.self)
    }

    /// Refuses a file dlopen must not be given. The dynamic loader maps a library's segments as its headers
    /// declare; when the file is shorter (a truncated copy, a download cut off) touching them raises SIGBUS
    /// inside the loader and the process dies, so `--backend auto` could not fall back. The 64-bit ELF header,
    /// the tables it locates and every loadable segment must lie inside the file. A file that is not a regular
    /// file (a FIFO would block dlopen) is refused too.
    static func checkCompleteSharedLibrary(_ path: String) throws {
        #if os(Linux)
        let descriptor: Int32, fileSize: Int
        do {
            (descriptor, fileSize) = try openRegularFile(path)
        } catch {
            throw PEAError.backend("cuda: cannot load \(error)", kind: .unavailable)
        }
        defer { close(descriptor) }
        func incomplete(_ what: String) -> PEAError {
            .backend("cuda: \(path) is not a complete shared library (truncated?): \(what) (the file has \(fileSize) bytes)", kind: .unavailable)
        }
        /// `count` bytes at `offset`, nil when the file holds fewer.
        func bytes(at offset: Int, _ count: Int) -> [UInt8]? {
            var buffer = [UInt8](repeating: 0, count: count)
            let read = buffer.withUnsafeMutableBytes { pread(descriptor, $0.baseAddress, count, off_t(offset)) }
            return read == count ? buffer : nil
        }
        guard let header = bytes(at: 0, 64) else { throw incomplete("shorter than the 64-byte ELF header") }
        guard header[0..<4].elementsEqual([0x7F, 0x45, 0x4C, 0x46]) else {
            throw PEAError.backend("cuda: \(path) is not a shared library (no ELF magic number)", kind: .unavailable)
        }
        guard header[4] == 2, header[5] == 1 else {
            throw PEAError.backend("cuda: \(path) is not a 64-bit little-endian ELF library", kind: .unavailable)
        }
        func field(_ at: Int, _ width: Int) -> Int {
            (0..<width).reduce(0) { $0 | Int(header[at + $1]) << (8 * $1) }
        }
        // e_phoff, e_shoff and the table sizes: every number is checked, a size is never added past the file.
        func checkTable(_ name: String, offset: Int, count: Int, entrySize: Int) throws {
            guard offset >= 0, offset <= fileSize, count * entrySize <= fileSize - offset else {
                throw incomplete("its \(name) (\(count) × \(entrySize) bytes at \(offset)) ends past the end of the file")
            }
        }
        let programOffset = field(32, 8), programEntrySize = field(54, 2), programCount = field(56, 2)
        try checkTable("program header table", offset: programOffset, count: programCount, entrySize: programEntrySize)
        try checkTable("section header table", offset: field(40, 8), count: field(60, 2), entrySize: field(58, 2))
        // The loadable segments (PT_LOAD): what the loader maps.
        guard programEntrySize >= 56 || programCount == 0 else { throw incomplete("program headers of \(programEntrySize) bytes") }
        for index in 0..<programCount {
            guard let entry = bytes(at: programOffset + index * programEntrySize, 56) else { throw incomplete("program header \(index) is cut off") }
            func entryField(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(entry[at + $1]) << (8 * UInt64($1)) } }
            let type = entry[0..<4].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
            guard type == 1 else { continue }  // PT_LOAD
            let offset = entryField(8), size = entryField(32)
            guard offset <= UInt64(fileSize), size <= UInt64(fileSize) - offset else {
                throw incomplete("loadable segment \(index) (\(size) bytes at \(offset)) ends past the end of the file")
            }
        }
        #endif
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
            return existsAsFile(file) ? .found(file)
                : .notFound("cuda: PEA_CUDA_LIB is set to \(value), but \(file) does not exist")
        }
        let candidates = searchPaths()
        if let first = candidates.first(where: existsAsFile) { return .found(first) }
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
    public static func searchPaths() -> [String] { librarySearchPaths(file: "libpea_cuda.so", buildFolder: ".build-cuda") }

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
}

/// free(3) for memory the C library allocated (a file-scope function: inside CUDALibrary `free` is the ABI's).
private func releaseCString(_ pointer: UnsafeMutablePointer<CChar>) { free(pointer) }
