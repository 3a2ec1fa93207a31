import XCTest
@testable import PEADiffusion

/// The JSON parser and serializer (RFC 8259 plus Python's NaN/Infinity) and `ConfigFile`'s typed accessors.
final class JSONTests: XCTestCase {

    private func parse(_ text: String) throws -> JSONValue { try JSONValue.parse(text) }

    private func assertParseError(_ text: String, _ fragment: String, offset: Int? = nil, file: StaticString = #filePath, line: UInt = #line) {
        assertParseError(Array(text.utf8), fragment, offset: offset, file: file, line: line)
    }

    private func assertParseError(_ bytes: [UInt8], _ fragment: String, offset: Int? = nil, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let value = try JSONValue.parse(bytes)
            XCTFail("expected an error mentioning '\(fragment)', parsed \(value)", file: file, line: line)
        } catch let error as JSONParseError {
            XCTAssertTrue(error.description.contains(fragment), "'\(error)' does not mention '\(fragment)'", file: file, line: line)
            if let offset { XCTAssertEqual(error.offset, offset, "\(error)", file: file, line: line) }
        } catch {
            XCTFail("unexpected error type \(error)", file: file, line: line)
        }
    }

    // MARK: - Parsing

    func testParsesEveryKindOfValue() throws {
        XCTAssertEqual(try parse("null"), .null)
        XCTAssertEqual(try parse(" true "), .bool(true))
        XCTAssertEqual(try parse("\n\tfalse\r\n"), .bool(false))
        XCTAssertEqual(try parse("[]"), .array([]))
        XCTAssertEqual(try parse("{}"), .object([:]))
        XCTAssertEqual(try parse(#"[1, "two", [3], {"four": 4}, null, true]"#),
                       .array([.number(1), .string("two"), .array([.number(3)]), .object(["four": .number(4)]), .null, .bool(true)]))
        let config = try parse(#"{"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "sample_size": 64, "flip_sin_to_cos": true, "num_class_embeds": null}"#)
        XCTAssertEqual(config.objectValue?["block_out_channels"], .array([.number(320), .number(640), .number(1280), .number(1280)]))
        XCTAssertEqual(config.objectValue?["sample_size"]?.intValue, 64)
        XCTAssertEqual(config.objectValue?["num_class_embeds"], .null)
        XCTAssertEqual(config.objectValue?["_class_name"]?.stringValue, "UNet2DConditionModel")
        XCTAssertEqual(try parse(#"{"a": 1, "a": 2}"#), .object(["a": .number(2)]), "the last repeated key wins, as in Python")
    }

    func testStringEscapesAndSurrogatePairs() throws {
        XCTAssertEqual(try parse(#""\"\\\/\b\f\n\r\t""#), .string("\"\\/\u{8}\u{C}\n\r\t"))
        XCTAssertEqual(try parse(#""\u0041\u00e9\u00E9\u4e2d\u0000""#), .string("Aéé中\u{0}"))
        XCTAssertEqual(try parse(#""\ud83d\ude00 smile""#), .string("😀 smile"))
        XCTAssertEqual(try parse(#""\uD834\uDD1E""#), .string("𝄞"))
        XCTAssertEqual(try parse("\"raw ünïcode 😀 中文\""), .string("raw ünïcode 😀 中文"))
        XCTAssertEqual(try parse(#""plain""#), .string("plain"))
        XCTAssertEqual(try parse(#""""#), .string(""))
        XCTAssertEqual(try parse("\"mixed é \\n after\""), .string("mixed é \n after"))

        assertParseError(#""\ud83d""#, "lone high surrogate \\uD83D", offset: 1)
        assertParseError(#""\ud83d x""#, "lone high surrogate")
        assertParseError(#""\ude00""#, "lone low surrogate \\uDE00", offset: 1)
        assertParseError(#""\ud83d\u0041""#, "followed by \\u0041, not a low surrogate")
        assertParseError(#""\x""#, "invalid escape sequence '\\x'", offset: 1)
        assertParseError(#""\u12""#, "\\u")
        assertParseError(#""\u12G4""#, "invalid hex digit 'G'", offset: 5)
        assertParseError("\"tab\there\"", "unescaped control character byte 0x09", offset: 4)
        assertParseError("\"new\nline\"", "unescaped control character", offset: 4)
        assertParseError(#""unterminated"#, "unterminated string", offset: 0)
        assertParseError(#""escaped at end\"#, "unterminated")
        assertParseError([UInt8(ascii: "\"")] + [0x61, 0xC3, 0x28] + [UInt8(ascii: "\"")], "invalid UTF-8", offset: 2)
        assertParseError([UInt8(ascii: "\"")] + [0xED, 0xA0, 0x80] + [UInt8(ascii: "\"")], "invalid UTF-8", offset: 1)  // encoded surrogate
        assertParseError([UInt8(ascii: "\""), 0x5C, 0x6E, 0xFF, UInt8(ascii: "\"")], "invalid UTF-8", offset: 3)
        assertParseError([0xEF, 0xBB, 0xBF] + Array("{}".utf8), "byte order mark", offset: 0)
    }

    func testNumbers() throws {
        XCTAssertEqual(try parse("0"), .number(0))
        XCTAssertEqual(try parse("-0"), .number(-0.0))
        XCTAssertEqual(try parse("320"), .number(320))
        XCTAssertEqual(try parse("-17"), .number(-17))
        XCTAssertEqual(try parse("1.5"), .number(1.5))
        XCTAssertEqual(try parse("0.00085"), .number(0.00085))
        XCTAssertEqual(try parse("-1.25e-3"), .number(-1.25e-3))
        XCTAssertEqual(try parse("1E10"), .number(1e10))
        XCTAssertEqual(try parse("2e+2"), .number(200))
        XCTAssertEqual(try parse("0.18215"), .number(0.18215))
        XCTAssertEqual(try parse("9007199254740993"), .number(9007199254740992))
        XCTAssertEqual(try parse("1e400"), .number(.infinity), "overflow becomes infinity, as in Python")
        XCTAssertEqual(try parse("-1e400"), .number(-.infinity))
        XCTAssertEqual(try parse("1e-400"), .number(0))
        XCTAssertEqual(try parse("320.0").intValue, 320)
        XCTAssertNil(try parse("1.5").intValue)
        XCTAssertNil(try parse("1e300").intValue)

        XCTAssertEqual(try parse("Infinity"), .number(.infinity))
        XCTAssertEqual(try parse("-Infinity"), .number(-.infinity))
        guard case .number(let nan) = try parse("NaN") else { return XCTFail("NaN is a number") }
        XCTAssertTrue(nan.isNaN)
        XCTAssertEqual(try parse("[NaN, Infinity, -Infinity]").arrayValue?.count, 3)

        assertParseError("01", "leading zero", offset: 1)
        assertParseError("-01", "leading zero")
        assertParseError("1.", "expected a digit after '.'", offset: 2)
        assertParseError(".5", "unexpected '.', expected a value", offset: 0)
        assertParseError("+1", "unexpected '+'")
        assertParseError("-", "expected a digit", offset: 1)
        assertParseError("1e", "digit in the exponent", offset: 2)
        assertParseError("1e+", "digit in the exponent")
        assertParseError("0x10", "unexpected 'x' after the JSON value", offset: 1)
        assertParseError("nan", "invalid literal, expected 'null'")
        assertParseError("Inf", "invalid literal, expected 'Infinity'")
        assertParseError("-Inf", "invalid literal, expected 'Infinity'")
        assertParseError("tru", "expected 'true'", offset: 0)
    }

    func testErrorsGiveOffsetLineAndColumn() throws {
        assertParseError("", "unexpected end of input", offset: 0)
        assertParseError("   ", "unexpected end of input", offset: 3)
        assertParseError(#"{"a": 1,}"#, "expected a string key", offset: 8)
        assertParseError(#"{"a" 1}"#, "expected ':' after key \"a\"", offset: 5)
        assertParseError(#"{"a": 1 "b": 2}"#, "expected ',' or '}'", offset: 8)
        assertParseError("[1 2]", "expected ',' or ']'", offset: 3)
        assertParseError("[1,]", "expected a value", offset: 3)
        assertParseError("[1", "unexpected end of input inside an array", offset: 2)
        assertParseError(#"{"a":1"#, "unexpected end of input inside an object", offset: 6)
        assertParseError("{} {}", "after the JSON value", offset: 3)
        assertParseError("{'a': 1}", "unexpected ''', expected a string key", offset: 1)
        assertParseError([UInt8(ascii: "["), 0x01, UInt8(ascii: "]")], "unexpected byte 0x01", offset: 1)
        do {
            _ = try JSONValue.parse("{\n  \"a\": 1,\n  \"b\": tru\n}")
            XCTFail("expected an error")
        } catch let error as JSONParseError {
            XCTAssertEqual(error.offset, 19)
            XCTAssertEqual(error.line, 3)
            XCTAssertEqual(error.column, 8)
            XCTAssertEqual(error.description, "invalid literal, expected 'true' at byte offset 19 (line 3, column 8)")
        }
    }

    func testNestingDepthIsLimited() throws {
        let limit = JSONValue.maximumDepth
        let deepest = String(repeating: "[", count: limit) + String(repeating: "]", count: limit)
        XCTAssertNoThrow(try parse(deepest))
        let objects = String(repeating: "{\"a\":", count: limit) + "0" + String(repeating: "}", count: limit)
        XCTAssertNoThrow(try parse(objects))
        assertParseError(String(repeating: "[", count: limit + 1) + String(repeating: "]", count: limit + 1), "nesting deeper than \(limit) levels", offset: limit)
        assertParseError(String(repeating: "[", count: 1_000_000), "nesting deeper than \(limit) levels", offset: limit)
        assertParseError(String(repeating: "{\"a\":[", count: 100_000), "nesting deeper than \(limit) levels")
    }

    // MARK: - Serializing

    func testSerializerIsCompactAndPythonCompatible() throws {
        XCTAssertEqual(JSONValue.null.serialized(), "null")
        XCTAssertEqual(JSONValue.bool(true).serialized(), "true")
        XCTAssertEqual(JSONValue.number(320).serialized(), "320")
        XCTAssertEqual(JSONValue.number(320.0).serialized(), "320")
        XCTAssertEqual(JSONValue.number(-0.0).serialized(), "0")
        XCTAssertEqual(JSONValue.number(-17).serialized(), "-17")
        XCTAssertEqual(JSONValue.number(1.5).serialized(), "1.5")
        XCTAssertEqual(JSONValue.number(0.1).serialized(), "0.1")
        XCTAssertEqual(JSONValue.number(1e-5).serialized(), "1e-05")
        XCTAssertEqual(JSONValue.number(9007199254740992).serialized(), "9007199254740992")
        XCTAssertEqual(JSONValue.number(1e20).serialized(), "1e+20")
        XCTAssertEqual(JSONValue.number(.nan).serialized(), "NaN")
        XCTAssertEqual(JSONValue.number(.infinity).serialized(), "Infinity")
        XCTAssertEqual(JSONValue.number(-.infinity).serialized(), "-Infinity")
        XCTAssertEqual(JSONValue.string("a\"b\\c/d\n\t\r\u{8}\u{C}\u{1}\u{1F}\u{7F}é😀").serialized(),
                       #""a\"b\\c/d\n\t\r\b\f\u0001\u001f"# + "\u{7F}é😀\"")
        XCTAssertEqual(JSONValue.array([.number(1), .string("x"), .null]).serialized(), #"[1,"x",null]"#)
        XCTAssertEqual(JSONValue.object(["b": .number(2), "a": .array([]), "B": .object([:])]).serialized(), #"{"B":{},"a":[],"b":2}"#)
    }

    func testSerializerRoundTrips() throws {
        let values: [JSONValue] = [
            .object([
                "_class_name": .string("AutoencoderKL"),
                "block_out_channels": .array([128, 256, 512, 512].map { .number($0) }),
                "scaling_factor": .number(0.18215),
                "beta_start": .number(0.00085),
                "tiny": .number(Double.leastNonzeroMagnitude),
                "huge": .number(1.7976931348623157e308),
                "negative": .number(-123456789),
                "flag": .bool(false),
                "missing": .null,
                "nested": .object(["deep": .array([.array([.string("\u{0}\u{1}\"\\ünï😀")])])]),
                "": .string(""),
            ]),
            .array([]), .string("plain"), .number(1e-7), .number(.infinity), .number(-.infinity),
        ]
        for value in values {
            XCTAssertEqual(try JSONValue.parse(value.serialized()), value, value.serialized())
        }
        let text = #"{"a":[1,2.5,"x",{"b":null}],"c":true}"#
        XCTAssertEqual(try parse(text).serialized(), text)
    }

    // MARK: - ConfigFile

    private func writeConfig(_ text: String, in scratch: ScratchDirectory) -> String {
        scratch.write(text, to: "config.json")
    }

    func testConfigAccessorsReadTypedValues() throws {
        let scratch = ScratchDirectory("pea-config")
        let path = writeConfig("""
        {
          "_class_name": "UNet2DConditionModel",
          "_diffusers_version": "0.6.0",
          "attention_head_dim": 8,
          "attention_head_dims": [5, 10, 20, 20],
          "block_out_channels": [320, 640, 1280, 1280],
          "cross_attention_dim": 768.0,
          "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
          "flip_sin_to_cos": true,
          "norm_eps": 1e-05,
          "scaling_factor": 0.18215,
          "num_class_embeds": null,
          "trained_betas": [0.1, 0.2],
          "clip_sample_range": Infinity,
          "nested": {"inner": 1}
        }
        """, in: scratch)
        let config = try ConfigFile(path: path)
        XCTAssertEqual(config.path, path)
        XCTAssertEqual(try config.string("_class_name"), "UNet2DConditionModel")
        XCTAssertEqual(try config.int("attention_head_dim"), 8)
        XCTAssertEqual(try config.int("cross_attention_dim"), 768, "integral floats are integers")
        XCTAssertEqual(try config.int("sample_size", default: 64), 64)
        XCTAssertEqual(try config.int("num_class_embeds", default: 0), 0, "null takes the default")
        XCTAssertNil(try config.optionalInt("num_class_embeds"))
        XCTAssertNil(try config.optionalInt("absent"))
        XCTAssertEqual(try config.optionalInt("attention_head_dim"), 8)
        XCTAssertEqual(try config.double("norm_eps"), 1e-5)
        XCTAssertEqual(try config.double("attention_head_dim"), 8)
        XCTAssertEqual(try config.double("clip_sample_range"), .infinity)
        XCTAssertEqual(try config.double("absent", default: 0.5), 0.5)
        XCTAssertEqual(try config.optionalDouble("scaling_factor"), 0.18215)
        XCTAssertNil(try config.optionalDouble("num_class_embeds"))
        XCTAssertEqual(try config.bool("flip_sin_to_cos"), true)
        XCTAssertEqual(try config.bool("center_input_sample", default: false), false)
        XCTAssertNil(try config.optionalBool("absent"))
        XCTAssertEqual(try config.string("absent", default: "x"), "x")
        XCTAssertEqual(try config.optionalString("_diffusers_version"), "0.6.0")
        XCTAssertNil(try config.optionalString("num_class_embeds"))
        XCTAssertEqual(try config.intList("block_out_channels"), [320, 640, 1280, 1280])
        XCTAssertEqual(try config.stringList("down_block_types"), ["CrossAttnDownBlock2D", "DownBlock2D"])
        XCTAssertEqual(try config.doubleList("trained_betas"), [0.1, 0.2])
        XCTAssertEqual(try config.intOrList("attention_head_dim", count: 4), [8, 8, 8, 8])
        XCTAssertEqual(try config.intOrList("attention_head_dims", count: 4), [5, 10, 20, 20])
        XCTAssertEqual(try config.object("nested"), ["inner": .number(1)])
        XCTAssertEqual(try ConfigFile(path: path, values: config.object("nested")).int("inner"), 1)
        XCTAssertTrue(config.contains("num_class_embeds"))
        XCTAssertFalse(config.contains("absent"))
        XCTAssertEqual(config.value("flip_sin_to_cos"), .bool(true))
    }

    func testConfigErrorsNameTheFileTheKeyAndWhatWasFound() throws {
        let scratch = ScratchDirectory("pea-config")
        let path = writeConfig(#"{"sample_size": 1.5, "name": "unet", "flag": 1, "heads": [8, 8, 8], "blocks": ["a", 2], "huge": 1e300, "nothing": null, "list": 3}"#, in: scratch)
        let config = try ConfigFile(path: path)
        assertThrowsError(containing: [path, "missing key 'in_channels'"]) { try config.int("in_channels") }
        assertThrowsError(containing: [path, "missing key 'in_channels'"]) { try config.string("in_channels") }
        assertThrowsError(containing: [path, "missing key 'heads2'"]) { try config.intOrList("heads2", count: 4) }
        assertThrowsError(containing: [path, "key 'sample_size': expected an integer, found 1.5"]) { try config.int("sample_size") }
        assertThrowsError(containing: [path, "key 'sample_size': expected an integer, found 1.5"]) { try config.int("sample_size", default: 3) }
        assertThrowsError(containing: [path, "key 'huge': expected an integer, found 1e+300"]) { try config.int("huge") }
        assertThrowsError(containing: [path, "key 'name': expected an integer, found a string \"unet\""]) { try config.int("name") }
        assertThrowsError(containing: [path, "key 'name': expected a number, found a string"]) { try config.double("name") }
        assertThrowsError(containing: [path, "key 'flag': expected a boolean, found an integer 1"]) { try config.bool("flag") }
        assertThrowsError(containing: [path, "key 'flag': expected a string, found an integer 1"]) { try config.string("flag") }
        assertThrowsError(containing: [path, "key 'nothing': expected an integer, found null"]) { try config.int("nothing") }
        assertThrowsError(containing: [path, "key 'heads': expected an integer or a list of 4 integers, found a list of 3"]) { try config.intOrList("heads", count: 4) }
        assertThrowsError(containing: [path, "key 'name': expected an integer or a list of 2 integers, found a string"]) { try config.intOrList("name", count: 2) }
        assertThrowsError(containing: [path, "key 'blocks[1]': expected a string, found an integer 2"]) { try config.stringList("blocks") }
        assertThrowsError(containing: [path, "key 'blocks[0]': expected an integer, found a string \"a\""]) { try config.intList("blocks") }
        assertThrowsError(containing: [path, "key 'list': expected a list, found an integer 3"]) { try config.intList("list") }
        assertThrowsError(containing: [path, "key 'list': expected an object"]) { try config.object("list") }
        XCTAssertEqual(try config.intOrList("heads", count: 3), [8, 8, 8])

        let notObject = scratch.write("[1, 2]", to: "list.json")
        assertThrowsError(containing: [notObject, "expected a JSON object at the top level, found an array of 2"]) { try ConfigFile(path: notObject) }
        let broken = scratch.write("{\"a\": 1,\n \"b\": }", to: "broken.json")
        assertThrowsError(containing: [broken, "invalid JSON", "offset 15 (line 2, column 7)"]) { try ConfigFile(path: broken) }
        let missing = scratch.file("absent.json")
        assertThrowsError(containing: [missing, "cannot open"]) { try ConfigFile(path: missing) }
    }

    func testConfigAcceptsPythonNonFiniteNumbers() throws {
        let scratch = ScratchDirectory("pea-config")
        let path = writeConfig(#"{"a": NaN, "b": -Infinity}"#, in: scratch)
        let config = try ConfigFile(path: path)
        XCTAssertTrue(try config.double("a").isNaN)
        XCTAssertEqual(try config.double("b"), -.infinity)
        assertThrowsError(containing: [path, "key 'a': expected an integer, found NaN"]) { try config.int("a") }
    }
}
