#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Training across processes the way clusters run them: the launcher people already use (mpirun, srun) starts one
// `pea` per GPU or node, and pea joins that job through MPI. MPI is optional: `make mpi` builds libpea_mpi.so
// (CKernels/mpi/pea_mpi.c) against the system's MPI, and pea loads it with dlopen only when the environment says
// a launcher started more than one process, so the default build has no MPI dependency.

/// The job a launcher started this process in, read from the variables each launcher sets.
public struct LaunchEnvironment: Equatable, Sendable {
    /// This process's index in the job (0..<size) and on its node (which GPU it takes).
    public var rank: Int
    public var size: Int
    public var localRank: Int
    /// Which launcher's variables were read (for messages).
    public var launcher: String

    public init(rank: Int, size: Int, localRank: Int, launcher: String) {
        self.rank = rank
        self.size = size
        self.localRank = localRank
        self.launcher = launcher
    }

    /// The CUDA device this rank takes when --device is not given: its local rank, wrapped around the devices
    /// CUDA_VISIBLE_DEVICES leaves it (`visibleDevices`, that variable's value) — with one GPU per task (srun
    /// --gpus-per-task=1, --gres per task) every rank sees its own GPU as device 0.
    public func device(visibleDevices: String?) -> Int {
        guard let visibleDevices, case let count = visibleDevices.split(separator: ",").count, count > 0 else { return localRank }
        return localRank % count
    }

    /// The launch `detect` finds in this process's environment, when it names several processes.
    public static func currentJob() throws -> LaunchEnvironment? {
        try detect(processEnvironment()).flatMap { $0.size > 1 ? $0 : nil }
    }

    /// The device `device(visibleDevices:)` gives with this process's CUDA_VISIBLE_DEVICES.
    public func device() -> Int { device(visibleDevices: getenv("CUDA_VISIBLE_DEVICES").map { String(cString: $0) }) }

    /// (size, rank, local rank) variables of Open MPI's mpirun, MPICH's Hydra (and Intel MPI), and Slurm's srun,
    /// in that order of precedence. Slurm's step variables, not SLURM_NTASKS: a batch script itself sees the
    /// allocation's task count without having been started by srun.
    static let launchers: [(name: String, size: String, rank: String, localRank: String)] = [
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("an MPICH/PMI launcher", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
        ("srun (Slurm)", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    ]

    /// The variables `detect` reads, from this process's environment.
    public static func processEnvironment() -> [String: String] {
        var environment: [String: String] = [:]
        for launcher in launchers {
            for name in [launcher.size, launcher.rank, launcher.localRank] {
                if let value = getenv(name) { environment[name] = String(cString: value) }
            }
        }
        return environment
    }

    /// The launch of the first launcher whose size variable is set; nil when none is (a plain run). A launch of
    /// one process is returned too (size 1). A value that is not a number, or a rank outside the size, is an error.
    public static func detect(_ environment: [String: String]) throws -> LaunchEnvironment? {
        for launcher in launchers {
            guard let sizeText = environment[launcher.size] else { continue }
            func number(_ name: String, _ text: String?, in range: Range<Int>) throws -> Int {
                guard let text, let value = Int(text.trimmingWhitespace()), range.contains(value) else {
                    throw PEAError.usage("pea runs under \(launcher.name) (\(launcher.size) is set), but \(name) is "
                                         + "\(text.map { "'\($0)'" } ?? "(unset)"), not a number in \(range.lowerBound)..<\(range.upperBound)")
                }
                return value
            }
            let size = try number(launcher.size, sizeText, in: 1..<1_000_001)
            let rank = try number(launcher.rank, environment[launcher.rank], in: 0..<size)
            // The local rank only picks a GPU: a launcher that leaves it out gets device 0.
            let localRank = try environment[launcher.localRank].map { try number(launcher.localRank, $0, in: 0..<size) } ?? 0
            return LaunchEnvironment(rank: rank, size: size, localRank: localRank, launcher: launcher.name)
        }
        return nil
    }
}

/// The processes of one job: every rank runs the same steps and meets the others in the collectives. `single`
/// (one process, no MPI) makes every collective a no-op.
public final class ProcessGroup {
    public let rank: Int
    public let size: Int
    /// The launcher's view of this process (nil for `single`).
    public let launch: LaunchEnvironment?
    private let library: MPILibrary?

    public static let single = ProcessGroup(rank: 0, size: 1, launch: nil, library: nil)

    private init(rank: Int, size: Int, launch: LaunchEnvironment?, library: MPILibrary?) {
        self.rank = rank
        self.size = size
        self.launch = launch
        self.library = library
    }

    /// Rank 0 writes what the job writes (logs, checkpoints, images, the final adapter).
    public var isRoot: Bool { rank == 0 }

    /// "rank R of N", for messages.
    public var name: String { "rank \(rank) of \(size)" }

    /// Joins the job a launcher started: MPI_Init through libpea_mpi.so when the environment names more than one
    /// process, else `single` (no MPI). Throws when the shim is missing or MPI's view of the job disagrees with
    /// the launcher's variables.
    public static func join(environment: [String: String] = LaunchEnvironment.processEnvironment(),
                            library path: String? = nil) throws -> ProcessGroup {
        guard let launch = try LaunchEnvironment.detect(environment), launch.size > 1 else { return .single }
        let library = try MPILibrary(path: path, launch: launch)
        var rank: Int32 = -1, size: Int32 = 0
        try library.check(library.initialize(&rank, &size), "MPI_Init")
        guard Int(size) == launch.size, Int(rank) == launch.rank else {
            throw PEAError.backend("mpi: \(launch.launcher) says rank \(launch.rank) of \(launch.size), MPI_COMM_WORLD says rank \(rank) of \(size) "
                                   + "(\(library.path) built against another MPI than the launcher's?)", kind: .unavailable)
        }
        return ProcessGroup(rank: launch.rank, size: launch.size, launch: launch, library: library)
    }

    /// The element-wise sum of `values` over all ranks, in place (MPI_Allreduce, f32), on every rank.
    public func allReduceSum(_ values: inout [Float]) throws {
        guard let library else { return }
        let count = Int64(values.count)
        try library.check(values.withUnsafeMutableBufferPointer { library.allReduceSum($0.baseAddress, count) }, "MPI_Allreduce")
    }

    /// Every rank gets `root`'s bytes (the same count on every rank).
    public func broadcast(_ bytes: inout [UInt8], from root: Int) throws {
        guard let library else { return }
        let count = Int64(bytes.count)
        try library.check(bytes.withUnsafeMutableBytes { library.broadcast($0.baseAddress, count, Int32(root)) }, "MPI_Bcast")
    }

    public func barrier() throws {
        guard let library else { return }
        try library.check(library.barrier(), "MPI_Barrier")
    }

    /// Ends the whole job with `code` (MPI_Abort: the launcher stops every rank); a single process just exits.
    public func abort(_ code: Int32) -> Never {
        library?.abort(code)
        exit(code)
    }

    /// MPI_Finalize: the last call of a rank that ends normally (launchers count a rank that exits without it
    /// as failed).
    public func finish() throws {
        guard let library else { return }
        try library.check(library.finalize(), "MPI_Finalize")
    }
}

/// libpea_mpi.so, loaded with dlopen (the CUDA library's pattern, CUDALibrary.swift) and never unloaded.
///
/// Search order: `$PEA_MPI_LIB` (a file, or a folder holding libpea_mpi.so; when set, nothing else is tried);
/// then `librarySearchPaths` (beside the executable, then `.build-mpi/libpea_mpi.so` and `libpea_mpi.so` in the
/// current directory and in the repository above the executable: where `make mpi` writes it).
final class MPILibrary {
    static let abiVersion: Int32 = 1
    let path: String

    typealias VersionFn = @convention(c) () -> Int32
    typealias LastErrorFn = @convention(c) () -> UnsafePointer<CChar>?
    typealias InitFn = @convention(c) (UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?) -> Int32
    typealias AllReduceFn = @convention(c) (UnsafeMutablePointer<Float>?, Int64) -> Int32
    typealias BroadcastFn = @convention(c) (UnsafeMutableRawPointer?, Int64, Int32) -> Int32
    typealias BarrierFn = @convention(c) () -> Int32
    typealias AbortFn = @convention(c) (Int32) -> Void
    typealias FinalizeFn = @convention(c) () -> Int32

    let lastError: LastErrorFn, initialize: InitFn, allReduceSum: AllReduceFn, broadcast: BroadcastFn
    let barrier: BarrierFn, abort: AbortFn, finalize: FinalizeFn

    init(path explicit: String?, launch: LaunchEnvironment) throws {
        let started = "pea runs under \(launch.launcher) (\(launch.size) processes), which needs libpea_mpi.so, its MPI shim"
        let path: String
        if let explicit {
            path = explicit
        } else if let variable = getenv("PEA_MPI_LIB"), case let value = String(cString: variable), !value.isEmpty {
            path = isDirectory(value) ? value + "/libpea_mpi.so" : value
            guard existsAsFile(path) else {
                throw PEAError.backend("mpi: \(started); PEA_MPI_LIB is set to \(value), but \(path) does not exist (build the shim with 'make mpi')",
                                       kind: .unavailable)
            }
        } else {
            let candidates = librarySearchPaths(file: "libpea_mpi.so", buildFolder: ".build-mpi")
            guard let found = candidates.first(where: existsAsFile) else {
                throw PEAError.backend("mpi: \(started): build it with 'make mpi' (against the MPI that launches pea) or set PEA_MPI_LIB; "
                                       + "looked in: " + candidates.joined(separator: ", "), kind: .unavailable)
            }
            path = found
        }
        // RTLD_GLOBAL: Open MPI loads its own plugins with dlopen, and they look for libmpi's symbols globally.
        guard let handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw PEAError.backend("mpi: cannot load \(path): \(reason) (rebuild it with 'make mpi')", kind: .unavailable)
        }
        self.path = path
        func symbol<F>(_ name: String, _: F.Type) throws -> F {
            guard let address = dlsym(handle, name) else {
                throw PEAError.backend("mpi: \(path) does not export \(name): not a Pea MPI shim, or an old one (rebuild it: make mpi)",
                                       kind: .unavailable)
            }
            return unsafeBitCast(address, to: F.self)
        }
        let version = try symbol("pea_mpi_abi_version", VersionFn.self)()
        guard version == Self.abiVersion else {
            throw PEAError.backend("mpi: \(path) implements pea_mpi ABI version \(version), this pea expects \(Self.abiVersion) (rebuild it: make mpi)",
                                   kind: .unavailable)
        }
        lastError = try symbol("pea_mpi_last_error", LastErrorFn.self)
        initialize = try symbol("pea_mpi_init", InitFn.self)
        allReduceSum = try symbol("pea_mpi_allreduce_sum_f32", AllReduceFn.self)
        broadcast = try symbol("pea_mpi_broadcast", BroadcastFn.self)
        barrier = try symbol("pea_mpi_barrier", BarrierFn.self)
        abort = try symbol("pea_mpi_abort", AbortFn.self)
        finalize = try symbol("pea_mpi_finalize", FinalizeFn.self)
    }

    /// Throws the shim's message for a call that returned non-zero.
    func check(_ status: Int32, _ call: String) throws {
        guard status != 0 else { return }
        let message = lastError().map { String(cString: $0) } ?? ""
        throw PEAError.backend("mpi: \(message.isEmpty ? "\(call) failed (\(status))" : message)")
    }
}
