import XCTest
@testable import PEADiffusion

/// The PEA adapter against a PyTorch module written from the method's description
/// (tools/reference/make_multilingual_fixtures.py), loaded from torch.save files and from safetensors.
final class PEAAdapterTests: XCTestCase {
    let backend = CPUBackend()
    let root = fixturesDirectory() + "/multilingual"

    func check(_ adapter: PEAAdapter, case name: String, outputs prefix: String = "out", _ what: String) throws {
        let io = try SafeTensorsFile(path: "\(root)/\(name)/io.safetensors")
        let (sequence, pooled) = try adapter(backend.upload(io.tensor("states")))
        let expected = try io.tensor("\(prefix).sequence")
        XCTAssertEqual(sequence.shape, expected.shape, what)
        assertClose(try backend.downloadFloats(sequence), expected.floats(), .f32, "\(what) sequence")
        if io.contains("\(prefix).pooled") {
            let expectedPooled = try io.tensor("\(prefix).pooled")
            let actual = try XCTUnwrap(pooled, what)
            XCTAssertEqual(actual.shape, expectedPooled.shape, what)
            assertClose(try backend.downloadFloats(actual), expectedPooled.floats(), .f32, "\(what) pooled")
        } else {
            XCTAssertNil(pooled, what)
        }
    }

    func checkBothFormats(_ name: String) throws -> PEAAdapter {
        let fromTorch = try PEAAdapter.load(path: "\(root)/\(name)/pytorch_model.bin", backend: backend)
        try check(fromTorch, case: name, "\(name) (pytorch_model.bin)")
        let fromSafetensors = try PEAAdapter.load(path: "\(root)/\(name)/adapter.safetensors", backend: backend)
        try check(fromSafetensors, case: name, "\(name) (adapter.safetensors)")
        let fromFolder = try PEAAdapter.load(path: "\(root)/\(name)", backend: backend)
        try check(fromFolder, case: name, "\(name) (folder)")
        XCTAssertEqual(fromTorch.widths, fromSafetensors.widths)
        return fromTorch
    }

    func testSD1Form() throws {
        let adapter = try checkBothFormats("adapter_sd1")
        XCTAssertFalse(adapter.isSDXL)
        XCTAssertEqual(adapter.widths, [32, 48, 48, 24])
        XCTAssertEqual([adapter.inputDim, adapter.outputDim], [32, 24])
        XCTAssertNil(adapter.pooledDim)
        XCTAssertEqual(adapter.parameterCount, 2 * 32 + 32 * 48 + 48 * 48 + 48 * 24)
    }

    func testDepthIsReadFromTheCheckpoint() throws {
        let adapter = try checkBothFormats("adapter_sd1_deep")
        XCTAssertEqual(adapter.widths, [32, 40, 40, 40, 40, 24])
    }

    func testSDXLForm() throws {
        let adapter = try checkBothFormats("adapter_sdxl")
        XCTAssertTrue(adapter.isSDXL)
        XCTAssertEqual(adapter.widths, [32, 40, 40, 20])
        XCTAssertEqual(adapter.outputDim, 36)
        XCTAssertEqual(adapter.pooledDim, 20)
    }

    func testHalfPrecisionCheckpoint() throws {
        let adapter = try PEAAdapter.load(path: "\(root)/adapter_sdxl/pytorch_model_fp16.bin", backend: backend)
        try check(adapter, case: "adapter_sdxl", outputs: "out.fp16", "adapter_sdxl (float16 pytorch_model.bin)")
    }

    // MARK: Shapes and names that do not fit

    /// The SDXL adapter's tensors, edited, written as a safetensors file; loading it must fail naming `fragments`.
    func assertRefused(_ fragments: [String], file: StaticString = #filePath, line: UInt = #line,
                       edit: (inout [(name: String, tensor: HostTensor)]) -> Void) throws {
        let source = try SafeTensorsFile(path: "\(root)/adapter_sdxl/adapter.safetensors")
        var tensors = try source.names.map { (name: $0, tensor: try source.tensor($0)) }
        edit(&tensors)
        let scratch = ScratchDirectory()
        try SafeTensorsWriter.write(tensors, to: scratch.file("edited.safetensors"))
        assertThrowsError(containing: ["edited.safetensors"] + fragments, file: file, line: line) {
            try PEAAdapter.load(path: scratch.file("edited.safetensors"), backend: backend)
        }
    }

    func tensor(_ shape: [Int]) -> HostTensor { HostTensor([Float](repeating: 0.5, count: shape.reduce(1, *)), shape: shape) }

    func replace(_ name: String, with value: HostTensor?, in tensors: inout [(name: String, tensor: HostTensor)]) {
        tensors.removeAll { $0.name == name }
        if let value { tensors.append((name, value)) }
    }

    func testMismatchesNameTheTensor() throws {
        try assertRefused(["'projector.2.weight' has shape [40, 41]", "the 40 outputs of 'projector.0.weight'"]) {
            replace("projector.2.weight", with: tensor([40, 41]), in: &$0)
        }
        try assertRefused(["'projector.0.weight' has shape [40, 31]", "the layer norm's 32 features"]) {
            replace("projector.0.weight", with: tensor([40, 31]), in: &$0)
        }
        try assertRefused(["missing tensor 'projector.2.weight'", "'projector.4.weight' after it"]) {
            replace("projector.2.weight", with: nil, in: &$0)
        }
        try assertRefused(["unexpected tensor 'projector.0.bias'", "no bias"]) {
            $0.append(("projector.0.bias", tensor([40])))
        }
        try assertRefused(["unexpected tensor 'projector.1.weight'", "GELUs"]) {
            $0.append(("projector.1.weight", tensor([40, 40])))
        }
        try assertRefused(["unexpected tensor 'text_model.foo'"]) {
            $0.append(("text_model.foo", tensor([2])))
        }
        try assertRefused(["missing tensor 'fc.bias'"]) {
            replace("fc.bias", with: nil, in: &$0)
        }
        try assertRefused(["'fc.bias' has shape [35]", "36 outputs"]) {
            replace("fc.bias", with: tensor([35]), in: &$0)
        }
        try assertRefused(["'fc.weight' has shape [36, 21]", "projector's 20 outputs"]) {
            replace("fc.weight", with: tensor([36, 21]), in: &$0)
        }
        try assertRefused(["'layernorm.bias' has shape [31]"]) {
            replace("layernorm.bias", with: tensor([31]), in: &$0)
        }
        try assertRefused(["'projector.0.weight' has shape [40, 32, 1]", "a matrix [out, in]"]) {
            replace("projector.0.weight", with: tensor([40, 32, 1]), in: &$0)
        }
        try assertRefused(["missing tensor 'layernorm.weight'", "not a PEA adapter"]) {
            replace("layernorm.weight", with: nil, in: &$0)
        }
    }

    func testCommonPrefixIsAccepted() throws {
        let source = try SafeTensorsFile(path: "\(root)/adapter_sdxl/adapter.safetensors")
        let scratch = ScratchDirectory()
        try SafeTensorsWriter.write(try source.names.map { (name: "module.\($0)", tensor: try source.tensor($0)) }, to: scratch.file("prefixed.safetensors"))
        let adapter = try PEAAdapter.load(path: scratch.file("prefixed.safetensors"), backend: backend)
        try check(adapter, case: "adapter_sdxl", "adapter_sdxl (module. prefix)")
    }

    func testStatesOfTheWrongWidth() throws {
        let adapter = try PEAAdapter.load(path: "\(root)/adapter_sd1/adapter.safetensors", backend: backend)
        assertThrowsError(containing: ["states must be [B, L, 32]", "[1, 4, 24]"]) {
            try adapter(backend.zeros([1, 4, 24], dtype: .f32))
        }
        assertThrowsError(containing: ["without an adapter checkpoint"]) {
            try PEAAdapter.load(path: "\(root)/torch", backend: backend)
        }
    }
}
