import Foundation
import XCTest
import CKernels
@testable import PEADiffusion

/// The CUDA backend without a GPU: `CUDABackend` loads libpea_cuda_emu.so — the CKernels/cuda sources built by
/// g++ against the SIMT emulator (`make cuda-emu`; `make test` builds it first) — through the same dlopen path
/// as libpea_cuda.so, and every op is compared with the CPU backend on the same inputs at awkward shapes, in
/// f32, f16 and bf16; then the torch op fixtures, the tiny UNet and VAE against diffusers, the error messages,
/// the loader's messages and the CLI. The emulator is slow: shapes stay small.
///
/// Without the library these tests fail, saying to run `make cuda-emu`; PEA_SKIP_CUDA_EMU=1 skips them.
/// PEA_CUDA_EMU_LIB names another build of the library to test (libpea_cuda_emu.so in the repository by default).
final class CUDABackendParityTests: XCTestCase {
    static var repositoryRoot: String {
        var path = fixturesDirectory()
        for _ in 0..<2 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path
    }

    /// Where `make cuda-emu` writes the library (PEA_CUDA_EMU_LIB overrides it).
    static var emulatedLibraryPath: String {
        ProcessInfo.processInfo.environment["PEA_CUDA_EMU_LIB"] ?? repositoryRoot + "/libpea_cuda_emu.so"
    }

    struct EmulatedLibraryMissing: Error, CustomStringConvertible {
        let path: String
        var description: String {
            "\(path) does not exist: run `make cuda-emu` first (`make test` does), or set PEA_SKIP_CUDA_EMU=1 to skip the emulated CUDA tests"
        }
    }

    private static var sharedBackend: CUDABackend?
    let cpu = CPUBackend()

    /// The emulated library, loaded once.
    static func emulatedLibrary() throws -> CUDALibrary {
        if ProcessInfo.processInfo.environment["PEA_SKIP_CUDA_EMU"] == "1" {
            throw XCTSkip("PEA_SKIP_CUDA_EMU=1: the emulated CUDA backend is not tested")
        }
        if let shared = sharedBackend { return shared.library }
        guard FileManager.default.fileExists(atPath: emulatedLibraryPath) else { throw EmulatedLibraryMissing(path: emulatedLibraryPath) }
        return try CUDALibrary(path: emulatedLibraryPath)
    }

    /// One backend (one context) shared by the tests (this file's and the backward ops'), as a process would use it.
    static func sharedCUDA() throws -> CUDABackend {
        if let shared = sharedBackend { return shared }
        let backend = try CUDABackend(library: emulatedLibrary())
        sharedBackend = backend
        return backend
    }

    func cuda() throws -> CUDABackend { try Self.sharedCUDA() }

    // MARK: the harness

    static func random(_ shape: [Int], seed: UInt64, scale: Float = 1, offset: Float = 0) -> HostTensor {
        var generator = SplitMix64(seed: seed)
        return HostTensor(generator.normals(shape.reduce(1, *)).map { $0 * scale + offset }, shape: shape)
    }

    func random(_ shape: [Int], seed: UInt64, scale: Float = 1, offset: Float = 0) -> HostTensor {
        Self.random(shape, seed: seed, scale: scale, offset: offset)
    }

    /// Tolerances by dtype: docs/testing.md's for f32; for f16/bf16 the rounding of the output (and of the
    /// intermediates a kernel stores) to that dtype, the CPU computing on the same rounded inputs.
    func tolerance(_ dtype: DType) -> ParityTolerance { Self.tolerance(dtype) }

    static func tolerance(_ dtype: DType) -> ParityTolerance {
        switch dtype {
        case .f16: return ParityTolerance(relativeL2: CUDASelfTest.tolerance(.f16), maxAbsolute: 4e-3)
        case .bf16: return ParityTolerance(relativeL2: CUDASelfTest.tolerance(.bf16), maxAbsolute: 3e-2)
        default: return .f32
        }
    }

    /// Runs `c` on both backends in each dtype and compares the outputs (shape, dtype and values).
    func check(_ c: CUDASelfTest.Case, _ dtypes: [DType] = [.f32, .f16, .bf16], file: StaticString = #filePath, line: UInt = #line) throws {
        let cuda = try cuda()
        for dtype in c.dtypes ?? dtypes {
            let what = "\(c.name) \(dtype)"
            var cudaInputs: [String: Tensor] = [:], cpuInputs: [String: Tensor] = [:]
            for (key, host) in c.inputs {
                let stored = host.dtype == .f32 ? host.converted(to: dtype) : host
                cpuInputs[key] = try cpu.upload(stored.dtype.isFloatingPoint ? stored.converted(to: .f32) : stored)
                cudaInputs[key] = try cuda.upload(stored)
            }
            let expected = try c.run(cpu, cpuInputs).map(cpu.download)
            let outputs: [Tensor]
            do { outputs = try c.run(cuda, cudaInputs) } catch {
                XCTFail("\(what): \(error)", file: file, line: line)
                continue
            }
            let actual = try outputs.map(cuda.download)
            XCTAssertEqual(actual.map(\.shape), expected.map(\.shape), "\(what): shapes", file: file, line: line)
            for (i, (a, e)) in zip(actual, expected).enumerated() {
                let outputDType = e.dtype == .f32 && c.dtypes == nil ? dtype : e.dtype
                XCTAssertEqual(a.dtype, outputDType, "\(what) output \(i): dtype", file: file, line: line)
                assertClose(a.floats(), e.floats(), tolerance(dtype), "\(what) output \(i)", file: file, line: line)
            }
        }
    }

    typealias Run = (any ComputeBackend, [String: Tensor]) throws -> [Tensor]

    func op(_ op: Op, _ name: String, _ inputs: [String: HostTensor], dtypes: [DType]? = nil, _ run: @escaping Run) -> CUDASelfTest.Case {
        CUDASelfTest.Case(op: op, name: name, inputs: inputs, dtypes: dtypes, run: run)
    }

    // MARK: the library and the loader

    func testEmulatedLibraryIsCompleteAndOpensTheEmulatedDevice() throws {
        let cuda = try cuda()
        XCTAssertEqual(cuda.name, "cuda")
        XCTAssertEqual(cuda.library.missingSymbols, [], "kernels the library does not export yet")
        XCTAssertEqual(cuda.deviceName, "Pea SIMT emulator")
        XCTAssertEqual(cuda.computeCapability.major, 9)
        XCTAssertGreaterThan(cuda.totalMemory, 0)
        XCTAssertEqual(cuda.library.path, CUDALibrary.absolute(Self.emulatedLibraryPath))
        for op in Op.allCases {
            XCTAssertTrue(cuda.supports(op, dtype: .f32), "\(op) f32")
            let f32Only = op == .adamw || op == .sumOfSquares   // the adapter's optimizer: f32 weights
            XCTAssertEqual(cuda.supports(op, dtype: .f16), !f32Only, "\(op) f16")
            XCTAssertEqual(cuda.supports(op, dtype: .bf16), !f32Only, "\(op) bf16")
        }
        XCTAssertFalse(cuda.supports(.conv2d, dtype: .i32))
        XCTAssertTrue(cuda.supports(.embedding, dtype: .i64))
        XCTAssertTrue(cuda.supports(.permute, dtype: .i64))
    }

    /// The library's status codes become typed failure kinds (out of memory, invalid argument, …).
    func testLibraryFailuresCarryTheirKind() throws {
        let cuda = try cuda()
        do {
            _ = try cuda.zeros([1 << 30, 1 << 30], dtype: .f32)
            XCTFail("a 4 EiB tensor was allocated")
        } catch {
            XCTAssertEqual((error as? PEAError)?.backendFailure, .outOfMemory, "\(error)")
        }
        // Requests are also estimated against the device's own memory before allocating.
        XCTAssertEqual(cuda.deviceMemoryBytes, Double(cuda.totalMemory))
        XCTAssertNil(CPUBackend().deviceMemoryBytes)
        do {
            try MemoryBudget.require(2e9, device: (name: "cuda", bytes: 1e9), for: "a test request", error: { .backend($0, kind: .outOfMemory) })
            XCTFail("2 GB fit a 1 GB device")
        } catch {
            XCTAssertEqual("\(error)", "a test request needs 2.0 GB, more than the cuda device's 1.0 GB of memory")
        }
        XCTAssertEqual(CUDABackend.failureKind(Int32(PEA_CUDA_ERROR_INVALID)), .invalidArgument)
        XCTAssertEqual(CUDABackend.failureKind(Int32(PEA_CUDA_ERROR_KERNEL)), .launchFailure)
        XCTAssertEqual(CUDABackend.failureKind(Int32(PEA_CUDA_ERROR_NO_DEVICE)), .unavailable)
        do {
            _ = try CUDALibrary(path: "/nonexistent/libpea_cuda.so")
            XCTFail("a missing library loaded")
        } catch {
            XCTAssertEqual((error as? PEAError)?.backendFailure, .unavailable)
        }
    }

    func testLoaderErrorsSayWhatIsWrong() throws {
        _ = try Self.emulatedLibrary()
        assertThrowsError(containing: ["/nonexistent/libpea_cuda.so", "cannot load"]) {
            try CUDALibrary(path: "/nonexistent/libpea_cuda.so")
        }
        // A shared library that is not ours: the first symbol it lacks is named.
        let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"]
            .first(where: FileManager.default.fileExists)
        if let libm {
            assertThrowsError(containing: ["pea_cuda_abi_version", "libm"]) { try CUDALibrary(path: libm) }
        }
        // Search order: PEA_CUDA_LIB alone when set (a missing file is an error, not a reason to look elsewhere).
        withEnvironment("PEA_CUDA_LIB", "/nonexistent/dir/libpea_cuda.so") {
            guard case .notFound(let message) = CUDALibrary.locate() else { return XCTFail("PEA_CUDA_LIB ignored") }
            XCTAssertTrue(message.contains("PEA_CUDA_LIB") && message.contains("/nonexistent/dir/libpea_cuda.so"), message)
            guard case .failure(let why) = CUDABackend.availability() else { return XCTFail("available without a library") }
            XCTAssertEqual(why.reason, .noLibrary)
            XCTAssertTrue(why.userExpectsCUDA, "PEA_CUDA_LIB is set: the user expects CUDA")
        }
        withEnvironment("PEA_CUDA_LIB", Self.emulatedLibraryPath) {
            XCTAssertEqual(CUDALibrary.locate(), .found(Self.emulatedLibraryPath))
        }
        withEnvironment("PEA_CUDA_LIB", Self.repositoryRoot) {   // a folder: its libpea_cuda.so
            XCTAssertEqual(CUDALibrary.locate(), existsAsFile(Self.repositoryRoot + "/libpea_cuda.so")
                           ? .found(Self.repositoryRoot + "/libpea_cuda.so")
                           : .notFound("cuda: PEA_CUDA_LIB is set to \(Self.repositoryRoot), but \(Self.repositoryRoot)/libpea_cuda.so does not exist"))
        }
        withEnvironment("PEA_CUDA_LIB", nil) {
            let paths = CUDALibrary.searchPaths()
            let executableDirectory = parentFolder(executablePath()!)
            XCTAssertEqual(paths.first, executableDirectory + "/libpea_cuda.so")
            XCTAssertTrue(paths.contains(Self.repositoryRoot + "/.build-cuda/libpea_cuda.so"), "\(paths)")
            XCTAssertTrue(paths.contains(Self.repositoryRoot + "/libpea_cuda.so"), "\(paths)")
            XCTAssertFalse(paths.contains { $0.hasSuffix("_emu.so") }, "the emulator is never picked by the search")
            if case .notFound(let message) = CUDALibrary.locate() {
                for path in paths { XCTAssertTrue(message.contains(path), "\(message) should list \(path)") }
                guard case .failure(let why) = CUDABackend.availability() else { return XCTFail("available without a library") }
                XCTAssertFalse(why.userExpectsCUDA, "no library anywhere: auto stays silent")
            }
        }
    }

    func testABIMismatchAndMissingRequiredSymbolsAreRefused() throws {
        _ = try Self.emulatedLibrary()
        let scratch = ScratchDirectory("pea-cuda-abi")
        let source = scratch.write("""
            int pea_cuda_abi_version(void) { return ABI; }
            """, to: "fake.c")
        func build(_ abi: Int) throws -> String? {
            let output = scratch.file("libfake\(abi).so")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["cc", "-shared", "-fPIC", "-DABI=\(abi)", "-o", output, source]
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            return process.terminationStatus == 0 ? output : nil
        }
        let version = Int(PEA_CUDA_ABI_VERSION)
        guard let wrongABI = try build(version + 1), let rightABI = try build(version) else { throw XCTSkip("no C compiler to build a fake library") }
        assertThrowsError(containing: ["ABI version \(version + 1)", "expects version \(version)", wrongABI]) { try CUDALibrary(path: wrongABI) }
        assertThrowsError(containing: ["pea_cuda_create", rightABI]) { try CUDALibrary(path: rightABI) }
    }

    func testNoDeviceIsReportedWithTheLibrarysMessage() throws {
        let library = try Self.emulatedLibrary()
        withEnvironment("PEA_EMU_DEVICE_COUNT", "0") {
            assertThrowsError(containing: ["no CUDA device", "device 0"]) { try CUDABackend(library: library) }
            withEnvironment("PEA_CUDA_LIB", Self.emulatedLibraryPath) {
                guard case .failure(let why) = CUDABackend.availability() else { return XCTFail("a device without a device") }
                XCTAssertTrue(why.userExpectsCUDA)
                if library.isComplete {
                    XCTAssertEqual(why.reason, .noDevice)
                    XCTAssertTrue(why.message.contains("no CUDA device"), why.message)
                }
            }
        }
        assertThrowsError(containing: ["device 3"]) { try CUDABackend(library: library, device: 3) }
    }

    // MARK: memory

    func testUploadDownloadZerosAndSynchronize() throws {
        let cuda = try cuda()
        for dtype in DType.allCases {
            let host = dtype.isFloatingPoint ? random([3, 5, 7], seed: 1).converted(to: dtype)
                : HostTensor(ids: (0..<105).map { $0 * 7 - 300 }, shape: [3, 5, 7], dtype: dtype)
            XCTAssertEqual(try cuda.download(cuda.upload(host)), host, "\(dtype) round trip")
            let zeros = try cuda.zeros([2, 9], dtype: dtype)
            XCTAssertEqual(try cuda.download(zeros), HostTensor(shape: [2, 9], dtype: dtype, bytes: .init(repeating: 0, count: 18 * dtype.byteSize)))
        }
        let empty = try cuda.upload(HostTensor([], shape: [0, 3]))
        XCTAssertEqual(try cuda.download(empty).shape, [0, 3])
        let scalar = try cuda.upload(HostTensor([2.5], shape: []))
        XCTAssertEqual(try cuda.downloadFloats(scalar), [2.5])
        try cuda.synchronize()
        // Reshaping shares the storage.
        XCTAssertEqual(try cuda.download(scalar.reshaped([1, 1])).floats(), [2.5])
    }

    func testFreedTensorsGoBackToTheCache() throws {
        let cuda = try cuda()
        let before = try cuda.memoryStats()
        do {
            let a = try cuda.zeros([1000], dtype: .f32)
            XCTAssertGreaterThanOrEqual(try cuda.memoryStats().bytesInUse, before.bytesInUse + 4000)
            _ = a
        }
        XCTAssertEqual(try cuda.memoryStats().bytesInUse, before.bytesInUse, "the tensor's block went back")
        let warm = try cuda.memoryStats().deviceAllocations
        for _ in 0..<5 { _ = try cuda.zeros([1000], dtype: .f32) }
        XCTAssertEqual(try cuda.memoryStats().deviceAllocations, warm, "reused from the cache")
        try cuda.releaseCache()
        _ = try cuda.zeros([1000], dtype: .f32)
        XCTAssertEqual(try cuda.memoryStats().deviceAllocations, warm + 1, "the cache was released: a new cudaMalloc")
    }

    func testOutOfMemoryIsAClearError() throws {
        let cuda = try cuda()
        assertThrowsError(containing: ["cannot allocate \(1 << 62) bytes", "cudaMalloc"]) { try cuda.zeros([1 << 61], dtype: .f16) }
        XCTAssertEqual(try cuda.downloadFloats(cuda.upload(HostTensor([7], shape: [1]))), [7], "usable afterwards")
    }

    // MARK: every op against the CPU backend

    func testGEMM() throws {
        let shapes: [(String, [Int], [Int], Bool, Bool, [Int]?, Float, Float)] = [
            ("one element", [1, 1], [1, 1], false, false, nil, 1, 0),
            ("nn odd", [13, 29], [29, 11], false, false, nil, 1, 0),
            ("nt beta", [13, 29], [11, 29], false, true, [13, 11], 0.5, 0.75),
            ("tn batched", [3, 29, 13], [3, 29, 11], true, false, nil, 1, 0),
            ("tt alpha beta batched", [2, 7, 5], [2, 9, 7], true, true, [2, 5, 9], -1.5, 2),
            ("shared a, batch 5", [6, 17], [5, 17, 33], false, false, nil, 1, 0),
            ("shared b", [4, 33, 17], [17, 6], false, false, nil, 0.125, 0),
            ("tiles 65x130x67", [65, 67], [67, 130], false, false, nil, 1, 0),
        ]
        // TF32 tensor cores for f32 GEMMs (off by default): inputs rounded to 10 mantissa bits, f16-like error.
        let cuda = try cuda()
        try cuda.setTF32(true)
        defer { try? cuda.setTF32(false) }
        let a = random([65, 67], seed: 1), b = random([67, 130], seed: 2)
        let tf32 = try cuda.downloadFloats(cuda.gemm(cuda.upload(a), cuda.upload(b), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil))
        let exact = try cpu.downloadFloats(cpu.gemm(cpu.upload(a), cpu.upload(b), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil))
        assertClose(tf32, exact, ParityTolerance(relativeL2: 2e-3, maxAbsolute: 2e-2), "gemm with TF32")
        XCTAssertNotEqual(tf32, exact, "TF32 changed nothing")
        try cuda.setTF32(false)
        for (i, (label, a, b, ta, tb, c, alpha, beta)) in shapes.enumerated() {
            var inputs = ["a": random(a, seed: UInt64(10 * i)), "b": random(b, seed: UInt64(10 * i + 1))]
            if let c { inputs["c"] = random(c, seed: UInt64(10 * i + 2)) }
            try check(op(.gemm, "gemm \(label)", inputs) { backend, t in
                [try backend.gemm(t["a"]!, t["b"]!, transposeA: ta, transposeB: tb, alpha: alpha, beta: beta, c: t["c"])]
            })
        }
    }

    func testLinear() throws {
        try check(op(.linear, "linear [3,5,7]→9 bias", ["x": random([3, 5, 7], seed: 1), "w": random([9, 7], seed: 2), "b": random([9], seed: 3)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: t["b"]!)]
        })
        try check(op(.linear, "linear [2,33]→31", ["x": random([2, 33], seed: 4), "w": random([31, 33], seed: 5)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: nil)]
        })
        try check(op(.linear, "linear one", ["x": random([1], seed: 6), "w": random([1, 1], seed: 7), "b": random([1], seed: 8)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: t["b"]!)]
        })
    }

    func testConv2d() throws {
        let cases: [(String, [Int], [Int], (Int, Int), Padding2D, Bool)] = [
            ("3x3 same", [2, 3, 7, 5], [4, 3, 3, 3], (1, 1), .uniform(1), true),
            ("3x3 stride 2 asymmetric", [1, 5, 9, 8], [3, 5, 3, 3], (2, 2), Padding2D(top: 0, bottom: 1, left: 0, right: 1), true),
            ("1x1", [3, 4, 6, 6], [5, 4, 1, 1], (1, 1), .uniform(0), true),
            ("1x1 stride 2", [1, 4, 7, 7], [6, 4, 1, 1], (2, 2), .uniform(0), false),
            ("5x3 no bias stride (2,1)", [2, 2, 9, 7], [3, 2, 5, 3], (2, 1), Padding2D(top: 2, bottom: 1, left: 1, right: 0), false),
            ("one element", [1, 1, 1, 1], [1, 1, 1, 1], (1, 1), .uniform(0), true),
            ("wide 33 channels", [1, 33, 4, 5], [17, 33, 3, 3], (1, 1), .uniform(1), true),
        ]
        for (i, (label, x, w, stride, padding, hasBias)) in cases.enumerated() {
            var inputs = ["x": random(x, seed: UInt64(20 * i)), "w": random(w, seed: UInt64(20 * i + 1), scale: 0.3)]
            if hasBias { inputs["b"] = random([w[0]], seed: UInt64(20 * i + 2)) }
            try check(op(.conv2d, "conv2d \(label)", inputs) { b, t in
                [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"], stride: stride, padding: padding)]
            })
        }
    }

    /// conv2d(…, residual:) against the CPU's composed conv + add: f16/bf16 1×1 and 3×3 go through the implicit
    /// GEMM (residual in its epilogue; shapes with partial tiles in Cout and B·Ho·Wo, K tails, aligned and
    /// unaligned rows), f32 and the 5×3 kernel through im2col with the residual written before the GEMM.
    func testConv2dWithResidual() throws {
        let cases: [(String, [Int], [Int], (Int, Int), Padding2D, Bool)] = [
            ("3x3 s1, W 16, Cout 72", [2, 16, 5, 16], [72, 16, 3, 3], (1, 1), .uniform(1), true),
            ("3x3 s1 odd plane, no bias", [2, 8, 7, 9], [12, 8, 3, 3], (1, 1), .uniform(1), false),
            ("3x3 s2 downsample", [1, 8, 9, 8], [16, 8, 3, 3], (2, 2), Padding2D(top: 0, bottom: 1, left: 0, right: 1), true),
            ("3x3 s2 pad 1, Cin 12", [2, 12, 6, 6], [8, 12, 3, 3], (2, 2), .uniform(1), true),
            ("1x1 shortcut", [2, 24, 4, 6], [40, 24, 1, 1], (1, 1), .uniform(0), true),
            ("1x1 plane 9, Cin 20", [3, 20, 3, 3], [8, 20, 1, 1], (1, 1), .uniform(0), false),
            ("5x3 (im2col)", [1, 4, 7, 6], [3, 4, 5, 3], (1, 1), .uniform(1), true),
        ]
        for (i, (label, x, w, stride, padding, hasBias)) in cases.enumerated() {
            let y = try ShapeRules.conv2dOutput(x, weight: w, stride: stride, padding: padding)
            var inputs = ["x": random(x, seed: UInt64(40 * i)), "w": random(w, seed: UInt64(40 * i + 1), scale: 0.3),
                          "r": random(y, seed: UInt64(40 * i + 2), scale: 2)]
            if hasBias { inputs["b"] = random([w[0]], seed: UInt64(40 * i + 3)) }
            try check(op(.conv2d, "conv2d + residual \(label)", inputs) { b, t in
                [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"], stride: stride, padding: padding, residual: t["r"]!)]
            })
        }
        // the residual must have the output's shape on every backend: no broadcasting
        let cuda = try cuda()
        for backend in [cpu, cuda] as [any ComputeBackend] {
            assertThrowsError(containing: ["conv2d", "residual"]) {
                try backend.conv2d(backend.zeros([1, 2, 4, 4], dtype: .f32), weight: backend.zeros([3, 2, 3, 3], dtype: .f32), bias: nil,
                                   stride: (1, 1), padding: .uniform(1), residual: backend.zeros([1, 3, 1, 1], dtype: .f32))
            }
        }
    }

    /// linear(…, residual:) against the CPU's composed linear + add: cuBLASLt with the residual as C (with a
    /// bias) and the residual-prefill fallback (without).
    func testLinearWithResidual() throws {
        try check(op(.linear, "linear + residual [3,5,16]→24 bias", ["x": random([3, 5, 16], seed: 1), "w": random([24, 16], seed: 2),
                                                                       "b": random([24], seed: 3), "r": random([3, 5, 24], seed: 4)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: t["b"]!, residual: t["r"]!)]
        })
        try check(op(.linear, "linear + residual [7,33]→31", ["x": random([7, 33], seed: 5), "w": random([31, 33], seed: 6),
                                                              "r": random([7, 31], seed: 7)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: nil, residual: t["r"]!)]
        })
        let cuda = try cuda()
        for backend in [cpu, cuda] as [any ComputeBackend] {
            assertThrowsError(containing: ["linear", "residual"]) {
                try backend.linear(backend.zeros([2, 4], dtype: .f32), weight: backend.zeros([3, 4], dtype: .f32), bias: nil,
                                   residual: backend.zeros([3], dtype: .f32))
            }
        }
    }

    func testNormsAndSoftmax() throws {
        try check(op(.groupNorm, "groupNorm+silu [2,6,5,3] G3", ["x": random([2, 6, 5, 3], seed: 1, offset: 3), "g": random([6], seed: 2), "b": random([6], seed: 3)]) { b, t in
            [try b.groupNorm(t["x"]!, groups: 3, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: true)]
        })
        try check(op(.groupNorm, "groupNorm [3,4,7] G1 no affine", ["x": random([3, 4, 7], seed: 4)]) { b, t in
            [try b.groupNorm(t["x"]!, groups: 1, weight: nil, bias: nil, eps: 1e-6, fuseSiLU: false)]
        })
        try check(op(.groupNorm, "groupNorm [1,32,9,9] G32 (one channel per group)", ["x": random([1, 32, 9, 9], seed: 5), "g": random([32], seed: 6), "b": random([32], seed: 7)]) { b, t in
            [try b.groupNorm(t["x"]!, groups: 32, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: false)]
        })
        try check(op(.layerNorm, "layerNorm [3,5,33] offset mean", ["x": random([3, 5, 33], seed: 8, scale: 2, offset: 10), "g": random([33], seed: 9), "b": random([33], seed: 10)]) { b, t in
            [try b.layerNorm(t["x"]!, weight: t["g"]!, bias: t["b"]!, eps: 1e-5)]
        })
        try check(op(.layerNorm, "layerNorm [1,1] no affine", ["x": random([1, 1], seed: 11)]) { b, t in
            [try b.layerNorm(t["x"]!, weight: nil, bias: nil, eps: 1e-5)]
        })
        try check(op(.layerNorm, "layerNorm [2,1030]", ["x": random([2, 1030], seed: 12), "g": random([1030], seed: 13)]) { b, t in
            [try b.layerNorm(t["x"]!, weight: t["g"]!, bias: nil, eps: 1e-5)]
        })
        try check(op(.softmax, "softmax [3,7,31]", ["x": random([3, 7, 31], seed: 14, scale: 4)]) { b, t in [try b.softmax(t["x"]!)] })
        try check(op(.softmax, "softmax one", ["x": random([1], seed: 15)]) { b, t in [try b.softmax(t["x"]!)] })
        try check(op(.softmax, "softmax [2,1500]", ["x": random([2, 1500], seed: 16)]) { b, t in [try b.softmax(t["x"]!)] })
        var withInfinity = random([3, 6], seed: 17).floats()
        for j in 0..<6 { withInfinity[6 + j] = -.infinity }   // a row of −∞: zeros
        withInfinity[1] = -.infinity
        try check(op(.softmax, "softmax −∞", ["x": HostTensor(withInfinity, shape: [3, 6])]) { b, t in [try b.softmax(t["x"]!)] })
    }

    func testAttention() throws {
        // Head dims of the models (40, 80, 160 SD1.5; 64 SD2/SDXL/CLIP), and the fixtures' tiny ones (2, 3).
        let shapes: [(String, batch: Int, tq: Int, tk: Int, heads: Int, d: Int, dv: Int)] = [
            ("d40 self", 2, 19, 19, 2, 40, 40),
            ("d40 cross 77", 1, 9, 77, 1, 40, 40),
            ("d40 two query blocks, two key tiles", 1, 130, 70, 2, 40, 40),
            ("d64 batch 3", 3, 5, 7, 2, 64, 64),
            ("d80", 1, 33, 17, 1, 80, 80),
            ("d160", 1, 6, 70, 1, 160, 160),
            ("d8 one query one key", 1, 1, 1, 1, 8, 8),
            ("d2 (tiny UNet)", 2, 16, 5, 8, 2, 2),
            ("d3 (tiny UNet)", 1, 4, 4, 8, 3, 3),
            ("d64 value width 40", 1, 5, 9, 2, 64, 40),
        ]
        for (i, s) in shapes.enumerated() {
            let seed = UInt64(100 * i)
            try check(op(.attention, "attention \(s.0) [\(s.batch),\(s.tq),\(s.heads)x\(s.d)]·\(s.tk)",
                         ["q": random([s.batch, s.tq, s.heads * s.d], seed: seed), "k": random([s.batch, s.tk, s.heads * s.d], seed: seed + 1),
                          "v": random([s.batch, s.tk, s.heads * s.dv], seed: seed + 2)]) { b, t in
                [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: s.heads, mask: nil, causal: false, scale: nil)]
            })
        }
        // Causal (top-left aligned, Tq ≠ Tk), a key-padding mask [B,1,1,Tk], a full random mask, a [Tq,Tk] mask
        // broadcast over batch and heads, and an explicit scale.
        let q = random([2, 7, 128], seed: 1), k = random([2, 11, 128], seed: 2), v = random([2, 11, 128], seed: 3)
        var padding = [Float](repeating: 0, count: 2 * 11)
        for j in 8..<11 { padding[11 + j] = -.infinity }
        let masks: [(String, HostTensor?, Bool, Float?)] = [
            ("causal", nil, true, nil),
            ("key padding + causal", HostTensor(padding, shape: [2, 1, 1, 11]), true, nil),
            ("full random mask", random([2, 2, 7, 11], seed: 4), false, nil),
            ("[Tq,Tk] mask, scale 0.3", random([7, 11], seed: 5), false, 0.3),
            ("[Tk] mask", HostTensor(padding.suffix(11).map { $0 }, shape: [11]), false, nil),
        ]
        for (label, mask, causal, scale) in masks {
            var inputs = ["q": q, "k": k, "v": v]
            if let mask { inputs["m"] = mask }
            try check(op(.attention, "attention d64 \(label)", inputs) { b, t in
                [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: 2, mask: t["m"], causal: causal, scale: scale)]
            })
        }
        // A causal query row whose only visible keys are masked gets zeros, as the CPU defines it.
        var blocked = [Float](repeating: 0, count: 5)
        blocked[0] = -.infinity
        try check(op(.attention, "attention fully masked row", ["q": random([1, 3, 8], seed: 6), "k": random([1, 5, 8], seed: 7), "v": random([1, 5, 8], seed: 8),
                                                     "m": HostTensor(blocked, shape: [5])]) { b, t in
            [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: 1, mask: t["m"], causal: true, scale: nil)]
        })
    }

    func testElementwise() throws {
        for kind in Activation.allCases {
            try check(op(.activation, "activation \(kind.rawValue) [3,5,7]", ["x": random([3, 5, 7], seed: 1, scale: 3)]) { b, t in [try b.activation(t["x"]!, kind)] })
            try check(op(.activation, "activation \(kind.rawValue) one", ["x": random([1], seed: 2)]) { b, t in [try b.activation(t["x"]!, kind)] })
        }
        try check(op(.geglu, "geglu [3,5,18]", ["x": random([3, 5, 18], seed: 3, scale: 2)]) { b, t in [try b.geglu(t["x"]!)] })
        try check(op(.geglu, "geglu [1,2]", ["x": random([1, 2], seed: 4)]) { b, t in [try b.geglu(t["x"]!)] })
        let broadcasts: [(BinaryOp, [Int], [Int])] = [
            (.add, [2, 3, 5, 7], [2, 3, 5, 7]), (.add, [2, 3, 5, 7], [3, 1, 1]), (.add, [2, 6, 4, 4], [2, 6, 1, 1]),
            (.mul, [5, 1], [1, 6]), (.mul, [2, 9, 8], [8]), (.sub, [4, 1, 3], [2, 1]), (.sub, [1], [3, 4]),
            (.div, [3, 5, 7], [1]), (.div, [2, 3], [2, 3]), (.add, [], []), (.mul, [4, 1, 3], []),
        ]
        for (i, (kind, a, b)) in broadcasts.enumerated() {
            let divisor = kind == .div ? random(b, seed: UInt64(2 * i + 1), scale: 0.3, offset: 2) : random(b, seed: UInt64(2 * i + 1))
            try check(op(.binary, "\(kind.rawValue) \(a) \(b)", ["a": random(a, seed: UInt64(2 * i)), "b": divisor]) { backend, t in
                [try backend.binary(kind, t["a"]!, t["b"]!)]
            })
        }
        try check(op(.affine, "affine [3,5,7]", ["x": random([3, 5, 7], seed: 5)]) { b, t in [try b.affine(t["x"]!, scale: 0.18215, shift: -1.25)] })
        try check(op(.upsampleNearest2x, "upsample [2,3,5,7]", ["x": random([2, 3, 5, 7], seed: 6)]) { b, t in [try b.upsampleNearest2x(t["x"]!)] })
        try check(op(.upsampleNearest2x, "upsample one", ["x": random([1, 1, 1, 1], seed: 7)]) { b, t in [try b.upsampleNearest2x(t["x"]!)] })
        try check(op(.mean, "mean middle", ["x": random([3, 5, 7], seed: 8)]) { b, t in [try b.mean(t["x"]!, dim: 1, keepDim: false)] })
        try check(op(.mean, "mean last keep", ["x": random([3, 5, 7], seed: 9)]) { b, t in [try b.mean(t["x"]!, dim: -1, keepDim: true)] })
        try check(op(.mean, "mean first", ["x": random([6, 4], seed: 10)]) { b, t in [try b.mean(t["x"]!, dim: 0, keepDim: false)] })
        try check(op(.mean, "mean one", ["x": random([1], seed: 11)]) { b, t in [try b.mean(t["x"]!, dim: 0, keepDim: false)] })
    }

    func testDataMovement() throws {
        try check(op(.concat, "concat channels", ["0": random([2, 3, 4, 5], seed: 1), "1": random([2, 1, 4, 5], seed: 2), "2": random([2, 6, 4, 5], seed: 3)]) { b, t in
            [try b.concat([t["0"]!, t["1"]!, t["2"]!], dim: 1)]
        })
        try check(op(.concat, "concat last", ["0": random([3, 5], seed: 4), "1": random([3, 2], seed: 5)]) { b, t in [try b.concat([t["0"]!, t["1"]!], dim: -1)] })
        try check(op(.concat, "concat first", ["0": random([1, 7], seed: 6), "1": random([4, 7], seed: 7)]) { b, t in [try b.concat([t["0"]!, t["1"]!], dim: 0)] })
        try check(op(.split, "split uneven with an empty part", ["x": random([2, 9, 3], seed: 8)]) { b, t in try b.split(t["x"]!, sizes: [2, 0, 7], dim: 1) })
        try check(op(.split, "split last", ["x": random([3, 10], seed: 9)]) { b, t in try b.split(t["x"]!, sizes: [5, 5], dim: -1) })
        try check(op(.permute, "permute NCHW→NHWC", ["x": random([2, 3, 4, 5], seed: 10)]) { b, t in [try b.permute(t["x"]!, [0, 2, 3, 1])] })
        try check(op(.permute, "permute heads", ["x": random([2, 5, 3, 4], seed: 11)]) { b, t in [try b.permute(t["x"]!, [0, 2, 1, 3])] })
        try check(op(.permute, "permute reverse", ["x": random([2, 3, 4, 5], seed: 12)]) { b, t in [try b.permute(t["x"]!, [-1, 2, 1, 0])] })
        try check(op(.permute, "permute rank 0", ["x": HostTensor([4], shape: [])]) { b, t in [try b.permute(t["x"]!, [])] })
        // Integer tensors move too.
        let ids = HostTensor(ids: Array(0..<24), shape: [2, 3, 4], dtype: .i64)
        try check(op(.permute, "permute/concat/split i64", ["x": ids], dtypes: [.f32]) { b, t in
            let p = try b.permute(t["x"]!, [2, 0, 1])
            return [p, try b.concat([p, p], dim: 1)] + (try b.split(p, sizes: [1, 3], dim: 0))
        })
    }

    func testEmbeddingsAndCasts() throws {
        for idType in [DType.i32, .i64] {
            try check(op(.embedding, "embedding \(idType) [2,3] of [11,7]", ["ids": HostTensor(ids: [0, 10, 3, 3, 7, 1], shape: [2, 3], dtype: idType),
                                                                  "table": random([11, 7], seed: 1)]) { b, t in
                [try b.embedding(t["ids"]!, table: t["table"]!)]
            })
        }
        try check(op(.embedding, "embedding one", ["ids": HostTensor(ids: [0], shape: [1]), "table": random([1, 1], seed: 2)]) { b, t in
            [try b.embedding(t["ids"]!, table: t["table"]!)]
        })
        let timesteps: [(String, HostTensor, Int, Bool, Float, Float, Float)] = [
            ("i64 sd 320", HostTensor(ids: [999, 0, 500], shape: [3], dtype: .i64), 320, true, 0, 1, 10000),
            ("i32 odd dim shift 1", HostTensor(ids: [1, 77], shape: [2], dtype: .i32), 33, false, 1, 1, 10000),
            ("f32 scaled", HostTensor([0.5, 981.25], shape: [2]), 16, true, 0, 1000, 100),
            ("f16 timesteps", HostTensor([999, 1.5], shape: [2], dtype: .f16), 8, true, 0, 1, 10000),
            ("bf16 timesteps", HostTensor([640, 2], shape: [2], dtype: .bf16), 8, false, 0, 1, 10000),
        ]
        for (label, t, dim, flip, shift, scale, period) in timesteps {
            try check(op(.timestepEmbedding, "timestepEmbedding \(label)", ["t": t], dtypes: [.f32]) { b, x in
                [try b.timestepEmbedding(x["t"]!, dim: dim, flipSinToCos: flip, downscaleFreqShift: shift, scale: scale, maxPeriod: period)]
            })
        }
        // Casts must round exactly as the CPU's ck_convert (and torch) do.
        let cuda = try cuda()
        var values = random([257], seed: 3, scale: 100).floats()
        values += [0, -0.0, 65504, 70000, -70000, 1e-8, 6e-5, .infinity, -.infinity, 3.4e38, 1.00048828125, 1.0009765625]
        let sources = [HostTensor(values, shape: [values.count]), HostTensor(values, shape: [values.count], dtype: .f16),
                       HostTensor(values, shape: [values.count], dtype: .bf16),
                       HostTensor(ids: [-5, 0, 7, 1 << 24 + 1], shape: [4], dtype: .i32), HostTensor(ids: [-5, 0, 7, 1 << 40], shape: [4], dtype: .i64)]
        for source in sources {
            for target in source.dtype.isFloatingPoint ? [DType.f32, .f16, .bf16] : [.f32] {
                let expected = try cpu.download(cpu.cast(cpu.upload(source), to: target))
                XCTAssertEqual(try cuda.download(cuda.cast(cuda.upload(source), to: target)), expected, "cast \(source.dtype) → \(target)")
            }
        }
        var nan = HostTensor([.nan], shape: [1])
        nan = try cuda.download(cuda.cast(cuda.upload(nan), to: .f16))
        XCTAssertTrue(nan.floats()[0].isNaN, "NaN stays NaN")
    }

    /// SD1.5's layer widths (320 channels in 32 groups, 8 heads of 40, 77-token context, head dims 64/80/160) at
    /// small spatial sizes: several tiles and blocks of every kernel, batch 2.
    func testSDShapedLayers() throws {
        try check(op(.groupNorm, "groupNorm+silu [2,320,8,8] G32", ["x": random([2, 320, 8, 8], seed: 1), "g": random([320], seed: 2), "b": random([320], seed: 3)]) { b, t in
            [try b.groupNorm(t["x"]!, groups: 32, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: true)]
        })
        // Fewer groups (8) than the emulator's 16 SMs, as SD1.5's 64 on an H100's 132: each group split over 4 blocks.
        try check(op(.groupNorm, "groupNorm+silu [2,64,32,32] G4", ["x": random([2, 64, 32, 32], seed: 16), "g": random([64], seed: 17), "b": random([64], seed: 18)]) { b, t in
            [try b.groupNorm(t["x"]!, groups: 4, weight: t["g"]!, bias: t["b"]!, eps: 1e-5, fuseSiLU: true)]
        })
        try check(op(.conv2d, "conv2d 3x3 [2,320,8,8]→320", ["x": random([2, 320, 8, 8], seed: 4), "w": random([320, 320, 3, 3], seed: 5, scale: 0.05), "b": random([320], seed: 6)]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (1, 1), padding: .uniform(1))]
        })
        try check(op(.conv2d, "conv2d downsample [2,320,8,8] stride 2", ["x": random([2, 320, 8, 8], seed: 7), "w": random([320, 320, 3, 3], seed: 8, scale: 0.05), "b": random([320], seed: 9)]) { b, t in
            [try b.conv2d(t["x"]!, weight: t["w"]!, bias: t["b"]!, stride: (2, 2), padding: .uniform(1))]
        })
        try check(op(.linear, "linear [2,77,768]→320", ["x": random([2, 77, 768], seed: 10), "w": random([320, 768], seed: 11, scale: 0.05)]) { b, t in
            [try b.linear(t["x"]!, weight: t["w"]!, bias: nil)]
        })
        try check(op(.layerNorm, "layerNorm [2,256,320]", ["x": random([2, 256, 320], seed: 12), "g": random([320], seed: 13), "b": random([320], seed: 14)]) { b, t in
            [try b.layerNorm(t["x"]!, weight: t["g"]!, bias: t["b"]!, eps: 1e-5)]
        })
        try check(op(.geglu, "geglu [2,64,2560]", ["x": random([2, 64, 2560], seed: 15)]) { b, t in [try b.geglu(t["x"]!)] })
        let attention: [(String, Int, Int, Int, Int)] = [
            ("self 8x40", 256, 256, 8, 40), ("cross 8x40", 256, 77, 8, 40), ("self 5x64", 300, 300, 5, 64),
            ("self 8x80", 64, 64, 8, 80), ("cross 8x160", 16, 77, 8, 160),
        ]
        for (i, (label, tq, tk, heads, d)) in attention.enumerated() {
            let seed = UInt64(100 + 10 * i)
            try check(op(.attention, "attention \(label) [2,\(tq)]·\(tk)", ["q": random([2, tq, heads * d], seed: seed), "k": random([2, tk, heads * d], seed: seed + 1),
                                                                "v": random([2, tk, heads * d], seed: seed + 2)]) { b, t in
                [try b.attention(q: t["q"]!, k: t["k"]!, v: t["v"]!, heads: heads, mask: nil, causal: false, scale: nil)]
            })
        }
    }

    // MARK: errors

    /// Invalid arguments fail on the CUDA backend exactly as on the CPU backend (same error, same message).
    func testInvalidArgumentsFailAsOnTheCPU() throws {
        let cuda = try cuda()
        let cases: [(String, (any ComputeBackend) throws -> Any)] = [
            ("gemm inner", { b in try b.gemm(b.zeros([2, 3], dtype: .f32), b.zeros([4, 5], dtype: .f32), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }),
            ("gemm beta without c", { b in try b.gemm(b.zeros([2, 3], dtype: .f32), b.zeros([3, 5], dtype: .f32), transposeA: false, transposeB: false, alpha: 1, beta: 1, c: nil) }),
            ("gemm batches", { b in try b.gemm(b.zeros([2, 2, 3], dtype: .f32), b.zeros([3, 3, 5], dtype: .f32), transposeA: false, transposeB: false, alpha: 1, beta: 0, c: nil) }),
            ("linear width", { b in try b.linear(b.zeros([2, 3], dtype: .f32), weight: b.zeros([4, 5], dtype: .f32), bias: nil) }),
            ("linear bias", { b in try b.linear(b.zeros([2, 5], dtype: .f32), weight: b.zeros([4, 5], dtype: .f32), bias: b.zeros([3], dtype: .f32)) }),
            ("conv2d channels", { b in try b.conv2d(b.zeros([1, 3, 5, 5], dtype: .f32), weight: b.zeros([2, 4, 3, 3], dtype: .f32), bias: nil, stride: (1, 1), padding: .uniform(1)) }),
            ("conv2d kernel", { b in try b.conv2d(b.zeros([1, 3, 2, 2], dtype: .f32), weight: b.zeros([2, 3, 5, 5], dtype: .f32), bias: nil, stride: (1, 1), padding: .uniform(0)) }),
            ("groupNorm groups", { b in try b.groupNorm(b.zeros([1, 6, 2, 2], dtype: .f32), groups: 4, weight: nil, bias: nil, eps: 1e-5, fuseSiLU: false) }),
            ("layerNorm weight", { b in try b.layerNorm(b.zeros([2, 6], dtype: .f32), weight: b.zeros([5], dtype: .f32), bias: nil, eps: 1e-5) }),
            ("attention heads", { b in let x = try b.zeros([1, 4, 10], dtype: .f32); return try b.attention(q: x, k: x, v: x, heads: 3, mask: nil, causal: false, scale: nil) }),
            ("attention mask", { b in let x = try b.zeros([1, 4, 8], dtype: .f32); return try b.attention(q: x, k: x, v: x, heads: 2, mask: b.zeros([3, 4], dtype: .f32), causal: false, scale: nil) }),
            ("geglu odd", { b in try b.geglu(b.zeros([2, 5], dtype: .f32)) }),
            ("binary broadcast", { b in try b.binary(.mul, b.zeros([2, 3], dtype: .f32), b.zeros([4], dtype: .f32)) }),
            ("upsample rank", { b in try b.upsampleNearest2x(b.zeros([2, 3, 4], dtype: .f32)) }),
            ("concat shapes", { b in try b.concat([b.zeros([2, 3], dtype: .f32), b.zeros([3, 3], dtype: .f32)], dim: 1) }),
            ("concat dtypes", { b in try b.concat([b.zeros([2, 3], dtype: .f32), b.zeros([2, 3], dtype: .f16)], dim: 1) }),
            ("split sizes", { b in try b.split(b.zeros([2, 3], dtype: .f32), sizes: [1, 1], dim: 1) }),
            ("permute dims", { b in try b.permute(b.zeros([2, 3], dtype: .f32), [0, 0]) }),
            ("mean dim", { b in try b.mean(b.zeros([2, 3], dtype: .f32), dim: 2, keepDim: false) }),
            ("embedding ids dtype", { b in try b.embedding(b.zeros([2], dtype: .f32), table: b.zeros([4, 3], dtype: .f32)) }),
            ("timestepEmbedding rank", { b in try b.timestepEmbedding(b.zeros([2, 1], dtype: .f32), dim: 4, flipSinToCos: true, downscaleFreqShift: 0, scale: 1, maxPeriod: 10000) }),
        ]
        for (label, body) in cases {
            var cpuError = "", cudaError = ""
            do { _ = try body(cpu); XCTFail("\(label): the cpu accepted it") } catch { cpuError = "\(error)" }
            do { _ = try body(cuda); XCTFail("\(label): cuda accepted it") } catch { cudaError = "\(error)" }
            XCTAssertEqual(cudaError, cpuError, label)
        }
        // What only the CUDA backend can get wrong: mixed float dtypes, integer data, tensors from elsewhere.
        let x32 = try cuda.zeros([2, 4], dtype: .f32), w16 = try cuda.zeros([3, 4], dtype: .f16)
        assertThrowsError(containing: ["linear", "f32", "f16"]) { try cuda.linear(x32, weight: w16, bias: nil) }
        assertThrowsError(containing: ["attention", "different dtypes"]) {
            let q = try cuda.zeros([1, 2, 8], dtype: .f16)
            return try cuda.attention(q: q, k: q, v: q, heads: 1, mask: cuda.zeros([2], dtype: .f32), causal: false, scale: nil)
        }
        assertThrowsError(containing: ["softmax", "i32"]) { try cuda.softmax(cuda.zeros([2], dtype: .i32)) }
        assertThrowsError(containing: ["conv2d", "'cpu'", "upload it first"]) {
            try cuda.conv2d(cpu.zeros([1, 1, 3, 3], dtype: .f32), weight: cuda.zeros([1, 1, 1, 1], dtype: .f32), bias: nil, stride: (1, 1), padding: .uniform(0))
        }
        assertThrowsError(containing: ["download"]) { try cpu.download(cuda.zeros([1], dtype: .f32)) }
        let other = try CUDABackend(library: cuda.library)
        assertThrowsError(containing: ["affine", "another CUDA backend"]) { try cuda.affine(other.zeros([2], dtype: .f32), scale: 1, shift: 0) }
    }

    /// An id outside the vocabulary is found on the device; the error comes with the next waiting call.
    func testOutOfRangeIdsAreReported() throws {
        let cuda = try cuda()
        let table = try cuda.upload(random([5, 3], seed: 1))
        do {
            let y = try cuda.embedding(cuda.upload(HostTensor(ids: [1, 5], shape: [2], dtype: .i32)), table: table)
            _ = try cuda.download(y)
            XCTFail("an id of 5 in a vocabulary of 5 was accepted")
        } catch {
            XCTAssertTrue("\(error)".contains("embedding"), "\(error) should name the op")
        }
        // The backend stays usable afterwards.
        XCTAssertEqual(try cuda.downloadFloats(cuda.affine(cuda.upload(HostTensor([1, 2], shape: [2])), scale: 2, shift: 1)), [3, 5])
    }

    // MARK: torch fixtures, models

    /// The CUDA backend passes the same torch fixtures as the CPU backend.
    func testEveryOpFixtureMatchesTorch() throws {
        let cuda = try cuda()
        let fixtures = try OpFixture.all()
        XCTAssertEqual(CPUOpParityTests.requiredOps.subtracting(fixtures.map(\.op)), [], "ops without a torch fixture")
        for fixture in fixtures {
            let outputs: [String: HostTensor]
            do { outputs = try fixture.run(on: cuda) } catch {
                XCTFail("\(fixture.name): \(error)")
                continue
            }
            XCTAssertEqual(Set(outputs.keys), Set(fixture.outputs.keys), "\(fixture.name): output names")
            for (key, expected) in fixture.outputs {
                guard let actual = outputs[key] else { continue }
                let what = "\(fixture.name) out.\(key) (cuda)"
                XCTAssertEqual(actual.shape, expected.shape, "\(what): shape")
                if expected.dtype == .f32 {
                    assertClose(actual.floats(), expected.floats(), .f32, what)
                } else {
                    XCTAssertEqual(actual.dtype, expected.dtype, "\(what): dtype")
                    XCTAssertEqual(actual.bytes, expected.bytes, "\(what): bytes")
                }
            }
        }
    }

    func modelInputs(_ name: String, file ioFile: String = "io.safetensors", on backend: any ComputeBackend) throws
        -> (inputs: [String: Tensor], expected: [String: HostTensor]) {
        let file = try SafeTensorsFile(path: fixturesDirectory() + "/models/\(name)/" + ioFile)
        var inputs: [String: Tensor] = [:], expected: [String: HostTensor] = [:]
        for tensorName in file.names {
            if tensorName.hasPrefix("out.") { expected[String(tensorName.dropFirst(4))] = try file.tensor(tensorName) }
            else { inputs[tensorName] = try backend.upload(file.tensor(tensorName)) }
        }
        return (inputs, expected)
    }

    func assertMatches(_ actual: Tensor, _ expected: HostTensor?, _ what: String, on backend: any ComputeBackend,
                       file: StaticString = #filePath, line: UInt = #line) throws {
        guard let expected else { return XCTFail("\(what): no reference", file: file, line: line) }
        XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
        assertClose(try backend.downloadFloats(actual), expected.floats(), .f32, what, file: file, line: line)
    }

    /// The tiny SD1-style UNet on the CUDA backend against diffusers (output and every block's features),
    /// then repeated evaluations that take every block from the cache: no new device allocations.
    func testUNetMatchesDiffusersAndReusesDeviceMemory() throws {
        let cuda = try cuda()
        let (unet, unused) = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/models/unet_sd1", backend: cuda)
        XCTAssertEqual(unused, [])
        let (inputs, expected) = try modelInputs("unet_sd1", on: cuda)
        let unetInputs = DenoisingInputs(sample: inputs["sample"]!, timestep: inputs["timestep"]!, encoderHiddenStates: inputs["encoder_hidden_states"]!)
        let (sample, features) = try unet.evaluate(unetInputs, keepFeatures: true)
        try assertMatches(sample, expected["sample"], "unet_sd1 sample (cuda)", on: cuda)
        for (i, h) in features.down.enumerated() { try assertMatches(h, expected["down.\(i)"], "unet_sd1 down.\(i) (cuda)", on: cuda) }
        try assertMatches(XCTUnwrap(features.mid), expected["mid"], "unet_sd1 mid (cuda)", on: cuda)
        for (i, h) in features.up.enumerated() { try assertMatches(h, expected["up.\(i)"], "unet_sd1 up.\(i) (cuda)", on: cuda) }

        _ = try cuda.download(unet(unetInputs))   // warm: every size the evaluation needs is now cached
        let before = try cuda.memoryStats()
        for _ in 0..<2 { _ = try cuda.download(unet(unetInputs)) }
        let after = try cuda.memoryStats()
        XCTAssertEqual(after.deviceAllocations, before.deviceAllocations, "steady-state evaluations called cudaMalloc")
        XCTAssertEqual(after.bytesInUse, before.bytesInUse, "device memory in use grew over repeated evaluations")
        XCTAssertGreaterThan(after.peakBytes, 0)
    }

    /// The SD2-style UNet on a 7×10 latent (not a multiple of its 4): the upsamplers cut to their skips' sizes.
    func testUNetOnAnOddLatentMatchesDiffusers() throws {
        let cuda = try cuda()
        let (unet, _) = try UNet2DConditionModel.load(folder: fixturesDirectory() + "/models/unet_sd2", backend: cuda)
        let (inputs, expected) = try modelInputs("unet_sd2", file: "io_odd_latent.safetensors", on: cuda)
        let unetInputs = DenoisingInputs(sample: inputs["sample"]!, timestep: inputs["timestep"]!, encoderHiddenStates: inputs["encoder_hidden_states"]!)
        let (sample, features) = try unet.evaluate(unetInputs, keepFeatures: true)
        try assertMatches(sample, expected["sample"], "unet_sd2 7×10 sample (cuda)", on: cuda)
        for (i, h) in features.up.enumerated() { try assertMatches(h, expected["up.\(i)"], "unet_sd2 7×10 up.\(i) (cuda)", on: cuda) }
    }

    func testVAEMatchesDiffusers() throws {
        let cuda = try cuda()
        let (vae, unused) = try AutoencoderKL.load(folder: fixturesDirectory() + "/models/vae", backend: cuda)
        XCTAssertEqual(unused, [])
        let (inputs, expected) = try modelInputs("vae", on: cuda)
        let (mean, logvar) = try vae.encode(inputs["image"]!)
        try assertMatches(mean, expected["latent_mean"], "vae latent_mean (cuda)", on: cuda)
        try assertMatches(logvar, expected["latent_logvar"], "vae latent_logvar (cuda)", on: cuda)
        try assertMatches(vae.decode(inputs["latents"]!), expected["sample"], "vae decoded sample (cuda)", on: cuda)
    }

    /// Several requests denoised together on the device (one UNet call per step for every image, each request
    /// with its own generator and negative prompt): diffusers' images, as on the CPU.
    func testBatchedPipelineMatchesDiffusers() throws {
        let cuda = try cuda()
        let c = try XCTUnwrap(PipelineParityTests.batchedCases().first { $0.name == "sd1_euler_a_generators" })
        let pipeline = try StableDiffusionPipeline.load(folder: PipelineParityTests.directory + "/" + c.pipeline, backend: cuda, scheduler: c.scheduler)
        let images = try pipeline.generate(c.requests)
        assertSameImages(images.flatMap { $0 }, try c.expectedImages(), "\(c.name) (cuda)")
    }

    /// The selftest's own harness at small shapes (what `pea selftest --backend cuda --quick` runs), f32.
    func testSelftestPassesAtSmallShapes() throws {
        let cuda = try cuda()
        let checks = CUDASelfTest.run(cuda: cuda, reference: cpu, scale: .small, dtypes: [.f32])
        XCTAssertGreaterThan(checks.count, 40)
        for check in checks where !check.passed {
            XCTFail("selftest \(check.name): \(check.error ?? "rel_l2 \(check.relativeL2) > \(check.tolerance)")")
        }
    }

    // MARK: the command line

    /// `--backend auto` with a library but no device says why it uses the CPU, in one line; `--backend cuda`
    /// fails with the loader's message.
    func testCommandLineBackendChoice() throws {
        _ = try Self.emulatedLibrary()
        let scratch = ScratchDirectory("pea-cuda-cli")
        let vae = fixturesDirectory() + "/models/vae"
        let decode = ["eval", "vae-decode", "--model", vae, "--inputs", vae + "/io.safetensors", "--output", scratch.file("out.safetensors")]

        let noDevice = try runPea(decode, environment: ["PEA_CUDA_LIB": Self.emulatedLibraryPath, "PEA_EMU_DEVICE_COUNT": "0"])
        XCTAssertEqual(noDevice.status, 0, noDevice.stderr)
        let lines = noDevice.stderr.split(separator: "\n").filter { $0.contains("CUDA") }
        XCTAssertEqual(lines.count, 1, noDevice.stderr)
        XCTAssertTrue(lines.first.map { $0.hasPrefix("pea: CUDA unavailable (") && $0.hasSuffix("; using the CPU") } ?? false, noDevice.stderr)

        let missing = try runPea(decode + ["--backend", "cuda"], environment: ["PEA_CUDA_LIB": "/nonexistent/libpea_cuda.so"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("--backend cuda") && missing.stderr.contains("/nonexistent/libpea_cuda.so"), missing.stderr)

        let fp16OnCPU = try runPea(decode + ["--precision", "fp16"], environment: ["PEA_CUDA_LIB": "/nonexistent/libpea_cuda.so"])
        XCTAssertEqual(fp16OnCPU.status, 2, fp16OnCPU.stderr)
        XCTAssertTrue(fp16OnCPU.stderr.contains("needs the CUDA backend"), fp16OnCPU.stderr)

        // No library anywhere (run from a folder without one, no PEA_CUDA_LIB): the CPU, silently.
        if case .notFound = CUDALibrary.locateWithoutEnvironment() {
            let silent = try runPea(decode, environment: ["PEA_CUDA_LIB": nil], directory: scratch.path)
            XCTAssertEqual(silent.status, 0, silent.stderr)
            XCTAssertFalse(silent.stderr.contains("CUDA"), silent.stderr)
        }
    }

    func testSelftestCommandOnTheEmulatedLibrary() throws {
        _ = try Self.emulatedLibrary()
        let result = try runPea(["selftest", "--backend", "cuda", "--quick", "--precision", "fp16"],
                                environment: ["PEA_CUDA_LIB": Self.emulatedLibraryPath])
        XCTAssertTrue(result.stdout.contains("cuda: cuda device 0 (Pea SIMT emulator"), result.stdout)
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        XCTAssertTrue(result.stdout.contains(" 0 failed"), result.stdout)
        XCTAssertTrue(result.stdout.contains("ok   attention self d40"), result.stdout)
    }

    func testProfileCountsOpCallsAndStopsWhenTheBodyThrows() throws {
        let cuda = try cuda()
        let x = try cuda.upload(random([4, 16], seed: 1)), w = try cuda.upload(random([8, 16], seed: 2))
        let image = try cuda.upload(random([1, 3, 6, 6], seed: 3)), kernel = try cuda.upload(random([2, 3, 3, 3], seed: 4))
        let (sum, profile) = try cuda.profiled { () -> Tensor in
            _ = try cuda.linear(x, weight: w, bias: nil)
            _ = try cuda.conv2d(image, weight: kernel, bias: nil, stride: (1, 1), padding: .uniform(1))
            return try cuda.linear(x, weight: w, bias: nil)
        }
        XCTAssertEqual(sum.shape, [4, 8])
        XCTAssertEqual(profile.ops.map { $0.name }.sorted(), ["conv2d", "linear"])
        XCTAssertEqual(profile.ops.first { $0.name == "linear" }?.calls, 2)
        XCTAssertEqual(profile.ops.first { $0.name == "conv2d" }?.calls, 1)
        XCTAssertEqual(profile.ops.map { $0.milliseconds }, profile.ops.map { $0.milliseconds }.sorted(by: >))
        XCTAssertTrue(profile.ops.allSatisfy { $0.milliseconds >= 0 })
        XCTAssertGreaterThanOrEqual(profile.spanMilliseconds * 1.001 + 1e-4, profile.opMilliseconds)

        struct Stop: Error {}
        XCTAssertThrowsError(try cuda.profiled { _ = try cuda.linear(x, weight: w, bias: nil); throw Stop() }) {
            XCTAssertTrue($0 is Stop, "\($0)")
        }
        // the profile was stopped: stopping again is refused
        var count: Int32 = 0
        var span = 0.0
        XCTAssertNotEqual(cuda.library.function("pea_cuda_profile_stop", as: CUDALibrary.ProfileStopFn.self)?(cuda.context.handle, nil, 0, &count, &span) ?? 0, Int32(PEA_CUDA_OK))
    }

    /// The adapter's optimizer on the device: three clipped AdamW steps give the CPU's weights bit for bit
    /// (optimizer.cu computes what CKernels/cpu/optimizer.c does, in the same order, with no extra FMAs).
    func testAdamWOnTheDeviceMatchesTheCPUBitForBit() throws {
        let cuda = try cuda()
        func train(on backend: any ComputeBackend) throws -> (weights: [String: [Float]], norms: [Float]) {
            // ~6,000 parameters: enough values that a stray FMA or a reordered sum would show in some bit
            let training = try AdapterOptimization(adapter: PEAAdapter.initialized(widths: [48, 64, 40], backend: backend, seed: 3),
                                                   weightDecay: 0.1, backend: backend)
            var norms: [Float] = []
            for step in 0..<3 {
                var gradients: [String: Tensor] = [:]
                for (k, (name, tensor)) in training.adapter.namedParameters.enumerated() {
                    gradients[name] = try backend.upload(random(tensor.shape, seed: UInt64(10 * step + k), scale: 0.3))
                }
                norms.append(try XCTUnwrap(training.apply(gradients, lr: 1e-3, maxNorm: 0.5)))
            }
            return (try training.masterWeights(), norms)
        }
        let onCPU = try train(on: cpu), onGPU = try train(on: cuda)
        XCTAssertTrue(onCPU.norms.allSatisfy { $0 > 0.5 }, "the steps must clip: \(onCPU.norms)")
        XCTAssertEqual(onGPU.norms, onCPU.norms)
        XCTAssertEqual(Set(onGPU.weights.keys), Set(onCPU.weights.keys))
        for (name, values) in onCPU.weights {
            XCTAssertEqual(onGPU.weights[name]?.map(\.bitPattern), values.map(\.bitPattern), name)
        }
    }

    func testBenchProfileOption() throws {
        _ = try Self.emulatedLibrary()
        let config = fixturesDirectory() + "/models/unet_sd1/config.json"
        let bench = ["bench", "unet", "--config", config, "--latent", "8x8", "--repeats", "1", "--profile"]
        let environment = ["PEA_CUDA_LIB": Self.emulatedLibraryPath]
        let table = try runPea(bench + ["--backend", "cuda"], environment: environment)
        XCTAssertEqual(table.status, 0, table.stderr)
        XCTAssertTrue(table.stdout.contains("GPU time per op, one evaluation"), table.stdout)
        XCTAssertTrue(table.stdout.contains("conv2d") && table.stdout.contains("attention") && table.stdout.contains("GPU span"), table.stdout)

        let json = try runPea(bench + ["--backend", "cuda", "--json"], environment: environment)
        XCTAssertEqual(json.status, 0, json.stderr)
        let object = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        let ops = object?["profile"] as? [[String: Any]] ?? []
        XCTAssertTrue(ops.contains { $0["op"] as? String == "group_norm" && ($0["calls"] as? Int ?? 0) > 0 }, json.stdout)
        XCTAssertNotNil(object?["profile_span_ms"] as? Double, json.stdout)

        let cpu = try runPea(bench + ["--backend", "cpu"], environment: environment)
        XCTAssertEqual(cpu.status, 2, cpu.stderr)
        XCTAssertTrue(cpu.stderr.contains("--profile") && cpu.stderr.contains("--backend cuda"), cpu.stderr)
    }

    // MARK: helpers

    func withEnvironment(_ name: String, _ value: String?, _ body: () throws -> Void) rethrows {
        let old = getenv(name).map { String(cString: $0) }
        if let value { setenv(name, value, 1) } else { unsetenv(name) }
        defer { if let old { setenv(name, old, 1) } else { unsetenv(name) } }
        try body()
    }

}

extension CUDALibrary {
    /// `locate()` as it would answer with PEA_CUDA_LIB unset.
    static func locateWithoutEnvironment() -> Location {
        searchPaths().first(where: fileExists).map { .found($0) } ?? .notFound("")
    }
}
