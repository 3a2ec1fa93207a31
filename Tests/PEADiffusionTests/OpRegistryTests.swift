import XCTest
@testable import PEADiffusion

/// The op registry (Backend/OpRegistry.swift) is the one list of ops: every suite that checks ops is held to it
/// here, so a new op without its CUDA function, its self-test case or its torch fixture fails a test.
final class OpRegistryTests: XCTestCase {
    func testEveryCUDAFunctionOfTheRegistryIsOnTheABIList() {
        let abi = Set(CUDALibrary.abiFunctions.map(\.name))
        XCTAssertEqual(CUDALibrary.abiFunctions.count, abi.count, "pea_cuda.h's PEA_CUDA_FUNCTIONS names a function twice")
        XCTAssertTrue(CUDALibrary.abiFunctions.contains { $0.name == "pea_cuda_create" && $0.required })
        XCTAssertTrue(CUDALibrary.abiFunctions.contains { $0.name == "pea_cuda_conv2d" && !$0.required })
        for op in Op.allCases {
            XCTAssertFalse(op.info.cudaFunctions.isEmpty, "\(op): no CUDA function")
            for function in op.info.cudaFunctions {
                XCTAssertTrue(abi.contains(function), "\(op): \(function) is not on pea_cuda.h's PEA_CUDA_FUNCTIONS list")
            }
        }
    }

    func testEveryOpHasACUDASelfTestCase() {
        var random = SplitMix64(seed: 1)
        let covered = Set(CUDASelfTest.cases(.small, &random).map(\.op))
        XCTAssertEqual(Set(Op.allCases).subtracting(covered), [], "ops without a case in CUDASelfTest (pea selftest --backend cuda)")
    }

    func testEveryOpIsCheckedAgainstAReference() {
        // Forward ops by torch fixtures; the others by the suites named in the registry's comment.
        for op in Op.allCases where op.info.torchFixtures.isEmpty {
            let isBackward = op.rawValue.hasSuffix("Backward") || op == .conv2dBackwardData
            XCTAssertTrue(isBackward || op == .adamw || op == .sumOfSquares, "\(op): no torch fixture and not a backward or optimizer op")
        }
    }

    func testBackwardAndOptimizerOpsAreNotDifferentiated() {
        for op in [Op.conv2dBackwardData, .groupNormBackward, .layerNormBackward, .softmaxBackward, .activationBackward,
                   .gegluBackward, .upsampleNearest2xBackward, .adamw, .sumOfSquares] {
            XCTAssertNil(op.info.backward, "\(op)")
        }
    }

    func testTheCPUBackendSupportsWhatTheRegistrySays() {
        let cpu = CPUBackend()
        for op in Op.allCases {
            XCTAssertTrue(cpu.supports(op, dtype: .f32), "\(op) f32")
            XCTAssertEqual(cpu.supports(op, dtype: .f16), op.info.dtypes == .any, "\(op) f16 (the CPU computes in f32)")
        }
        XCTAssertTrue(cpu.supports(.embedding, dtype: .i64))
        XCTAssertTrue(cpu.supports(.embedding, dtype: .f32), "an embedding's table is f32 on the CPU")
        XCTAssertFalse(cpu.supports(.adamw, dtype: .i32))
        // A taped CPU backend supports an op with the ops that differentiate it.
        let taped = TapedBackend(wrapping: cpu)
        for op in Op.allCases { XCTAssertEqual(taped.supports(op, dtype: .f32), cpu.supports(op, dtype: .f32), "\(op)") }
    }
}
